"""Through the API, the server gives the same text as faster-whisper run directly with the same
model and options, on real English speech with human references beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from faster_whisper import WhisperModel, decode_audio

from tests.conftest import LiveServer, wer

CLIPS = [
    "jfk.flac",
    "en_librispeech_61-70968-0000.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
]


@pytest.fixture(scope="module")
def direct_tiny(tiny_model: Path) -> WhisperModel:
    return WhisperModel(str(tiny_model), device="cpu", compute_type="int8")


def _direct(model: WhisperModel, path: Path) -> str:
    segments, _ = model.transcribe(decode_audio(str(path)), beam_size=5)
    return "".join(s.text for s in segments).strip()


@pytest.mark.parametrize("clip", CLIPS)
def test_same_text_as_faster_whisper(
    tiny_server: LiveServer, direct_tiny: WhisperModel, data_dir: Path, clip: str
) -> None:
    path = data_dir / clip
    resp = requests.post(
        tiny_server.url + "/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files={"file": ("upload", path.read_bytes())},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    served = resp.json()["text"]
    assert served == _direct(direct_tiny, path)
    reference = path.with_suffix(".txt").read_text()
    assert wer(reference, served) < 0.25, (reference, served)


def test_default_model_matches_direct(server_factory, data_dir: Path) -> None:
    """The embedded default (multilingual base) end to end, against faster-whisper on the
    folder the server installed."""
    server = server_factory()
    folder = server.engine.served.path
    assert folder is not None and (folder / "model.bin").is_file()
    direct = WhisperModel(str(folder), device="cpu", compute_type="int8")
    path = data_dir / "jfk.flac"
    resp = requests.post(
        server.url + "/v1/audio/transcriptions",
        data={"model": "whisper-1", "language": "en"},
        files={"file": ("upload", path.read_bytes())},
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    segments, _ = direct.transcribe(decode_audio(str(path)), beam_size=5, language="en")
    assert resp.json()["text"] == "".join(s.text for s in segments).strip()
