"""Through the API, the server gives the same text as faster-whisper run directly with the same
model and options, on real English speech with human references beside it: the batched pipeline's
under WHISPER_BATCHING=auto (every request is decoded window by window, cut at speech; the
pipeline's VAD hears the same louder copy as the server's), the sequential ``transcribe``'s with
batching off."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from faster_whisper import BatchedInferencePipeline, WhisperModel, decode_audio

from tests.conftest import LiveServer, wer, within

CLIPS = [
    "jfk.flac",
    "en_librispeech_61-70968-0000.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
]


@pytest.fixture(scope="module")
def direct_tiny(tiny_model: Path) -> WhisperModel:
    return WhisperModel(str(tiny_model), device="cpu", compute_type="int8")


def _windowed(model: WhisperModel, path: Path, **options: object) -> str:
    segments, _ = BatchedInferencePipeline(model).transcribe(
        decode_audio(str(path)), beam_size=5, **options
    )
    return "".join(s.text for s in segments).strip()


def _sequential(model: WhisperModel, path: Path) -> str:
    segments, _ = model.transcribe(decode_audio(str(path)), beam_size=5)
    return "".join(s.text for s in segments).strip()


def _served(server: LiveServer, path: Path, **fields: str) -> str:
    resp = requests.post(
        server.url + "/v1/audio/transcriptions",
        data={"model": "whisper-1", **fields},
        files={"file": ("upload", path.read_bytes())},
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["text"])


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.usefixtures("pipeline_hears_louder")
def test_same_text_as_faster_whisper(
    tiny_server: LiveServer, direct_tiny: WhisperModel, data_dir: Path, clip: str
) -> None:
    path = data_dir / clip
    served = _served(tiny_server, path)
    assert served == _windowed(direct_tiny, path)
    reference = path.with_suffix(".txt").read_text()
    assert within("WER vs reference", wer(reference, served), at_most=0.25), (reference, served)


def test_batching_off_is_faster_whisper_sequential(
    server_factory, tiny_model: Path, direct_tiny: WhisperModel, data_dir: Path
) -> None:
    server = server_factory(model=str(tiny_model), batching="off")
    for clip in ("jfk.flac", "en_librivox_sense_and_sensibility_01_0870.wav"):
        path = data_dir / clip
        assert _served(server, path) == _sequential(direct_tiny, path)


@pytest.mark.usefixtures("pipeline_hears_louder")
def test_default_model_matches_direct(server_factory, data_dir: Path) -> None:
    """The embedded default (multilingual base) end to end, against faster-whisper on the
    folder the server installed."""
    server = server_factory()
    folder = server.engine.served.path
    assert folder is not None and (folder / "model.bin").is_file()
    direct = WhisperModel(str(folder), device="cpu", compute_type="int8")
    path = data_dir / "jfk.flac"
    assert _served(server, path, language="en") == _windowed(direct, path, language="en")
