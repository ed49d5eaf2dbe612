"""Where the windowed path cuts a file into windows (server.whisper.cutting): the speech found
as faster-whisper finds it, half-heard pauses joined, windows that hold every sample of speech
once, never more than the limit, and end at a long pause or a stretch's quietest moment.
Synthetic probabilities for the packing; real clips and the real Silero model for the rest.
End to end (reverberant, hoarse and over-background-talk speech): tests/test_loudness.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from faster_whisper.vad import VadOptions, get_speech_timestamps

from server.audio.decode import SAMPLE_RATE, decode_audio
from server.audio.loudness import loud_for_vad
from server.whisper import cutting
from server.whisper.cutting import FRAME, join_weak_pauses, pack, speech_spans

SR = SAMPLE_RATE


def _s(seconds: float) -> int:
    return round(seconds * SR)


def _spans(*pairs: tuple[float, float]) -> list[dict[str, int]]:
    return [{"start": _s(a), "end": _s(b)} for a, b in pairs]


def _probabilities(seconds: float, speech: list[dict[str, int]], pause: float = 0.02) -> np.ndarray:
    """1.0 over ``speech``, ``pause`` elsewhere, one value per Silero frame."""
    p = np.full(_s(seconds) // FRAME + 1, pause, np.float32)
    for s in speech:
        p[s["start"] // FRAME : s["end"] // FRAME] = 1.0
    return p


def _seconds(windows: list[list[dict[str, int]]]) -> list[float]:
    return [sum(s["end"] - s["start"] for s in w) / SR for w in windows]


@pytest.mark.parametrize(
    "name",
    ["jfk.flac", "en_mfa_michaelandsickmichael.flac", "en_leopard_test.wav"],
)
def test_speech_is_found_as_faster_whisper_finds_it(data_dir: Path, name: str) -> None:
    """One Silero pass, turned into speech as get_speech_timestamps turns it (without its split
    of long stretches), for the batched path's options, the defaults and unusual ones."""
    audio = decode_audio((data_dir / name).read_bytes(), max_duration=120).samples
    probabilities = cutting.speech_probabilities(audio)
    for vad in (
        VadOptions(min_silence_duration_ms=160),
        VadOptions(),
        VadOptions(threshold=0.3, neg_threshold=0.2, min_speech_duration_ms=250, speech_pad_ms=50),
    ):
        expected = get_speech_timestamps(loud_for_vad(audio), vad)
        assert speech_spans(probabilities, len(audio), vad) == expected, vad


def test_a_half_heard_pause_is_joined_and_a_real_pause_is_not() -> None:
    """Between 5 and 9 s Silero half hears speech (0.1-0.4, as reverberant speech): joined.
    Between 12 and 13 s it hears nothing (0.02, as a pause of read speech): kept apart. A pause
    shorter than padding covers is never looked at."""
    speech = _spans((0, 5), (9, 12), (13, 15), (15.1, 16))
    p = _probabilities(16, speech)
    half_heard = slice(_s(5) // FRAME, _s(9) // FRAME)
    p[half_heard] = np.resize(np.float32([0.1, 0.4, 0.2, 0.05]), len(p[half_heard]))
    p[_s(15) // FRAME : _s(15.1) // FRAME] = 0.5
    assert join_weak_pauses(speech, p) == _spans((0, 12), (13, 15), (15.1, 16))


def test_uniform_pauses_fill_each_window_to_the_brim() -> None:
    """Read speech (sentences of 4-6 s, pauses of 0.3-0.6 s): the windows are the ones
    BatchedInferencePipeline's collect_chunks makes, so ordinary speech costs no more windows."""
    from faster_whisper.vad import collect_chunks

    rng = np.random.default_rng(3)
    at, pairs = 0.0, []
    while at < 300:
        length = float(rng.uniform(4, 6))
        pairs.append((at, at + length))
        at += length + float(rng.uniform(0.3, 0.6))
    speech = _spans(*pairs)
    windows = pack(speech, _probabilities(at, speech), 30)
    audio = np.zeros(_s(at) + 1, np.float32)
    _, metadata = collect_chunks(audio, speech, max_duration=30)
    assert _seconds(windows) == pytest.approx([m["duration"] for m in metadata])


def test_a_window_ends_at_a_long_pause() -> None:
    """A 2.4 s pause after 25 s of speech (a new speaker), 0.4 s pauses elsewhere: the window
    ends at the long pause rather than 1.4 s into the new speaker's first sentence."""
    speech = _spans((0, 8), (8.4, 17), (17.4, 25), (27.4, 28.8), (29.2, 30.6), (31, 40))
    windows = pack(speech, _probabilities(40, speech), 30)
    assert windows[0][-1]["end"] == _s(25)
    assert windows[1][0]["start"] == _s(27.4)


def test_a_long_pause_too_early_in_a_window_is_not_a_reason_to_end_it() -> None:
    """A long pause after 5 s of speech would leave a window a sixth full: it is filled on."""
    speech = _spans((0, 5), (8, 20), (20.4, 33), (33.4, 40))
    windows = pack(speech, _probabilities(40, speech), 30)
    assert windows[0] == _spans((0, 5), (8, 20), (20.4, 33))


def test_a_stretch_with_no_pause_is_cut_at_its_quietest_moment() -> None:
    """45 s of speech over background talk, VAD never pausing, the voice changing at 19 s: the
    first window ends there, not at 30 s in mid-sentence."""
    speech = _spans((0, 45))
    p = _probabilities(45, speech)
    p[_s(13) // FRAME : _s(13.2) // FRAME] = 0.6  # a dip, too early to cut at (under 15 s)
    p[_s(19) // FRAME : _s(19.3) // FRAME] = 0.7
    p[_s(28.8) // FRAME : _s(28.9) // FRAME] = 0.8
    windows = pack(speech, p, 30)
    assert len(windows) == 2
    cut = windows[0][-1]["end"] / SR
    assert 19.0 <= cut <= 19.3, cut
    assert windows[1] == [{"start": windows[0][-1]["end"], "end": _s(45)}]


@pytest.mark.parametrize("limit", [30, 10, 3])
def test_every_sample_of_speech_is_in_one_window_and_no_window_is_too_long(limit: int) -> None:
    """Random speech and probabilities (seeded), at Whisper's 30 s windows and the shorter ones
    the planner may choose: the windows hold the (joined) spans' samples exactly once, in order,
    and none holds more than ``limit`` seconds."""
    rng = np.random.default_rng(limit)
    for _ in range(200):
        at, pairs = 0.0, []
        for _ in range(int(rng.integers(1, 25))):
            at += float(rng.choice([0.0, rng.uniform(0.1, 5)]))
            length = float(rng.choice([rng.uniform(0.2, 8), rng.uniform(20, 90)]))
            pairs.append((at, at + length))
            at += length
        speech = _spans(*pairs)
        p = rng.uniform(0, 1, _s(at) // FRAME + 1).astype(np.float32)
        joined = join_weak_pauses(speech, p)
        windows = pack(joined, p, limit)
        assert all(0 < seconds <= limit for seconds in _seconds(windows))
        covered = [(s["start"], s["end"]) for w in windows for s in w]
        merged: list[list[int]] = []
        for a, b in covered:  # the pieces of a cut span meet end to start
            if merged and merged[-1][1] == a:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        expected: list[list[int]] = []
        for s in joined:
            if expected and expected[-1][1] == s["start"]:
                expected[-1][1] = s["end"]
            else:
                expected.append([s["start"], s["end"]])
        assert merged == expected


def test_windows_of_real_speech(data_dir: Path) -> None:
    """The MFA recording (a clear speaker, a 2.4 s pause, then the same man hoarse): the first
    window ends at that pause, where BatchedInferencePipeline's went 1.4 s into the hoarse
    voice; cut's clips are the windows' spans in order, and VAD's own speech is returned too."""
    audio = decode_audio(
        (data_dir / "en_mfa_michaelandsickmichael.flac").read_bytes(), max_duration=120
    ).samples
    vad = VadOptions(min_silence_duration_ms=160)
    heard, windows = cutting.windows_of(audio, vad, 30)
    assert heard == get_speech_timestamps(loud_for_vad(audio), vad)
    clips, chunks, _ = cutting.cut(audio, vad_filter=True, vad_parameters=vad, chunk_length=30)
    assert clips == [s for w in windows for s in w]
    assert [len(c) for c in chunks] == [sum(s["end"] - s["start"] for s in w) for w in windows]
    first_end = windows[0][-1]["end"] / SR
    assert 25.0 <= first_end <= 27.0, first_end
    assert windows[1][0]["start"] / SR >= 27.0
