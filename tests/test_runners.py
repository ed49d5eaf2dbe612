"""The faster-whisper adapter: the internals it relies on are still there, with the same shape.

``server/whisper/runner.py`` is the only module that calls faster-whisper, and some of what it calls
is private. These tests fail loudly, naming the function, when an upgrade changes any of it,
instead of letting transcripts change quietly; then a real batch run checks the pieces fit.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from faster_whisper import WhisperModel
from faster_whisper import transcribe as fw_transcribe
from faster_whisper import vad as fw_vad

from server.audio.decode import decode_audio
from server.batching.scheduler import Scheduler, WindowOptions
from server.memory.oom import is_out_of_memory
from server.whisper import cutting
from server.whisper.runner import (
    SAMPLE_RATE,
    TEMPERATURES,
    WhisperRunner,
)
from tests.conftest import within

# (object, attribute, parameters passed by position in this order, parameters passed by name)
CONTRACT = [
    (
        WhisperModel,
        "_split_segments_by_timestamps",
        [],
        ["tokenizer", "tokens", "time_offset", "segment_size", "segment_duration", "seek"],
    ),
    (
        WhisperModel,
        "add_word_timestamps",
        [
            "segments",
            "tokenizer",
            "encoder_output",
            "num_frames",
            "prepend_punctuations",
            "append_punctuations",
            "last_speech_timestamp",
        ],
        [],
    ),
    (
        WhisperModel,
        "find_alignment",
        ["tokenizer", "text_tokens", "encoder_output", "num_frames"],
        [],
    ),
    (
        WhisperModel,
        "get_prompt",
        ["tokenizer"],
        ["previous_tokens", "without_timestamps", "hotwords"],
    ),
    (WhisperModel, "encode", ["features"], []),
    (
        fw_transcribe,
        "restore_speech_timestamps",
        ["segments", "speech_chunks", "sampling_rate"],
        [],
    ),
    (fw_transcribe, "get_compression_ratio", ["text"], []),
    (fw_transcribe, "get_suppressed_tokens", ["tokenizer", "suppress_tokens"], []),
    (fw_vad, "get_speech_timestamps", ["audio", "vad_options"], ["sampling_rate"]),
    (fw_vad, "collect_chunks", ["audio", "chunks"], ["max_duration"]),
]


@pytest.mark.parametrize(
    ("owner", "name", "positional", "named"), CONTRACT, ids=[c[1] for c in CONTRACT]
)
def test_faster_whisper_internals_keep_their_signatures(
    owner: object, name: str, positional: list[str], named: list[str]
) -> None:
    function = getattr(owner, name, None)
    assert function is not None, (
        f"faster-whisper no longer has {name}; update server/whisper/runner.py"
    )
    found = [p for p in inspect.signature(function).parameters if p != "self"]
    assert found[: len(positional)] == positional and set(named) <= set(found), (
        f"faster-whisper's {name} now takes {found}; server/whisper/runner.py passes "
        f"{positional} by position and {named} by name"
    )


def test_segment_fields_the_adapter_builds() -> None:
    fields = set(inspect.signature(fw_transcribe.Segment).parameters)
    assert {
        "id",
        "seek",
        "start",
        "end",
        "text",
        "tokens",
        "avg_logprob",
        "compression_ratio",
        "no_speech_prob",
        "words",
        "temperature",
    } <= fields
    assert {"start", "end", "word", "probability"} <= set(
        inspect.signature(fw_transcribe.Word).parameters
    )


def test_the_fallback_schedule_is_faster_whispers() -> None:
    default = inspect.signature(WhisperModel.transcribe).parameters["temperature"].default
    assert tuple(default) == TEMPERATURES


def test_a_batch_through_the_adapter_gives_faster_whispers_text(
    tiny_model: Path, data_dir: Path
) -> None:
    """Encode, generate, split and align one window by hand, as the scheduler does, and
    compare with faster-whisper's ``BatchedInferencePipeline`` (greedy) on the same audio."""
    runner = WhisperRunner.load(
        tiny_model, device="cpu", device_index=0, compute_type="int8", cpu_threads=0, num_workers=1
    )
    audio = decode_audio((data_dir / "jfk.flac").read_bytes(), max_duration=60).samples
    clips, chunks, metadata = cutting.cut(
        audio, vad_filter=True, vad_parameters=None, chunk_length=30
    )
    assert len(chunks) == 1 and clips
    tokenizer = runner.tokenizer("en", "transcribe")
    prompt = runner.prompt(tokenizer, [], without_timestamps=True, hotwords=None)
    encoded = runner.encode([runner.features(chunks[0])])
    (result,) = runner.generate(
        encoded,
        [prompt],
        beam_size=1,
        suppress_tokens=runner.suppressed_tokens(tokenizer, (-1,)),
    )
    tokens = list(result.sequences_ids[0])
    duration = float(metadata[0]["duration"])
    size = int(np.ceil(duration) * runner.frames_per_second)
    segments = runner.split_segments(tokenizer, tokens, offset=0.0, size=size, duration=duration)
    for s in segments:
        s.update(text=tokenizer.decode(s["tokens"]), avg_logprob=0.0, no_speech_prob=0.0)
        s.update(compression_ratio=runner.compression_ratio(s["text"]), seek=0)
    alignment = runner.find_alignment(
        tokenizer, [[t for t in tokens if t < tokenizer.eot]], encoded, [size]
    )[0]
    runner.add_word_timestamps(
        segments,
        tokenizer,
        alignment,
        size,
        prepend_punctuations="\"'“¿([{-",
        append_punctuations="\"'.。,，!！?？:：”)]}、",
        last_speech_timestamp=0.0,
    )
    restored = runner.restore_timestamps(
        segments, clips, temperature=0.0, with_words=True, first_id=1
    )
    text = "".join(s.text for s in restored).strip()

    expected = runner.transcribe_batched(
        audio, 1, {"beam_size": 1, "temperature": 0.0, "language": "en"}
    )
    assert text == "".join(s.text for s in expected).strip()
    words = [w for s in restored for w in s.words or []]
    assert len(words) > 10
    assert all(0 <= w.start <= w.end <= len(audio) / SAMPLE_RATE + 0.5 for w in words)


def test_out_of_memory_is_recognised_through_wrappers() -> None:
    oom = RuntimeError("CUDA failed with error out of memory")
    wrapped = RuntimeError("a batch of 4 windows failed")
    wrapped.__cause__ = oom
    assert is_out_of_memory(oom) and is_out_of_memory(wrapped)
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a model error type


# ---- what VAD hears --------------------------------------------------------------------------


def test_a_quiet_hoarse_speaker_is_heard(data_dir: Path, tiny_model: Path) -> None:
    """The second speaker of the MFA clip (from 26.8 s; a cold, about 6.5 dB quieter) was
    heard as 1.9 s of speech in 25 s, so the windowed path decoded none of his words."""
    audio = decode_audio(
        (data_dir / "en_mfa_michaelandsickmichael.flac").read_bytes(), max_duration=60
    ).samples
    runner = WhisperRunner(WhisperModel(str(tiny_model), device="cpu", compute_type="int8"))
    second = int(26.8 * SAMPLE_RATE)
    clips = cutting.cut(audio, **_CUT)[0]
    heard = sum(max(0, c["end"] - max(c["start"], second)) for c in clips) / SAMPLE_RATE
    assert heard > 15, heard
    only_his = {"environment", "different", "bunch", "original", "pause", "probably"}
    with Scheduler(runner, max_batch=lambda key: 4) as scheduler:
        text = " ".join(s.text for s in scheduler.decode(audio, WindowOptions(language="en")))
    assert within("his words heard", len({w for w in only_his if w in text.lower()}), at_least=4), (
        text
    )


def test_noise_is_not_heard_as_speech() -> None:
    rng = np.random.default_rng(0)
    for level in (-30, -50, -70):
        noise = (rng.standard_normal(30 * SAMPLE_RATE) * 10 ** (level / 20)).astype(np.float32)
        assert cutting.cut(noise, **_CUT)[0] == [], level
    t = np.arange(20 * SAMPLE_RATE) / SAMPLE_RATE
    hum = (0.005 * np.sin(2 * np.pi * 50 * t)).astype(np.float32)
    assert cutting.cut(hum, **_CUT)[0] == []


_CUT = {"vad_filter": True, "vad_parameters": None, "chunk_length": 30}
