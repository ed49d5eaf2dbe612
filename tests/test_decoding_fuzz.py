"""Every container, channel count, sample format and rate the server may be sent, through
``json`` and ``diarized_json``, against a server in a process of its own: a crash is a failed
test (and a fresh server for the next case), not a dead test run.

The files are made at test time (``tests/media.py``). The cases are a covering design, not the
full cross product: every container with every channel count it can carry, and every decoded
sample format (packed s16, s32, flt, dbl; planar s16p, s32p, fltp) and every rate (8 to 192 kHz)
at least once; :func:`test_the_cases_cover_every_dimension` checks that. Planar dbl is what no
encoder in these containers makes: ``test_audio.py`` reads it from frames built in memory.
Among them is issue 21's crash: 8 channels of 16-bit WAV, diarized (the channel measurement
read planar frames of 8 or more channels out of bounds and took the server down).

Each intact file must transcribe (200), as ``json`` and as ``diarized_json``. A truncated copy
and a copy with bytes overwritten in the middle, diarized, must get 200 or a 4xx in OpenAI's
error envelope. After every answer the server must
still be running and ``/health`` must answer 200.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import free_port
from tests.media import Media, decoded_format

OPUS_WIDE = {"mapping_family": "255"}  # Opus streams of more than 8 channels
VORBIS = {"strict": "-2"}  # FFmpeg's own Vorbis encoder is marked experimental

CASES = [
    # wav: PCM in every packed format; 8 channels of noise, 3 s, is issue 21's crash
    Media("wav", "pcm_s16le", 1, 8000, "s16"),
    Media("wav", "pcm_s32le", 2, 44100, "s32"),
    Media("wav", "pcm_f32le", 3, 22050, "flt", separate=True),
    Media("wav", "pcm_f64le", 6, 48000, "dbl"),
    Media("wav", "pcm_s16le", 8, 16000, "s16", seconds=3.0, noise=True),
    Media("wav", "pcm_s16le", 8, 16000, "s16"),
    Media("wav", "pcm_s32le", 16, 11025, "s32"),
    Media("wav", "pcm_f32le", 32, 8000, "flt"),
    Media("wav", "pcm_s16le", 64, 16000, "s16", seconds=1.0),
    # flac: at most 8 channels (the format's own limit)
    Media("flac", "flac", 1, 192000, "s16"),
    Media("flac", "flac", 2, 96000, "s32", sample_format="s32", separate=True),
    Media("flac", "flac", 3, 11025, "s16"),
    Media("flac", "flac", 6, 88200, "s32", sample_format="s32"),
    Media("flac", "flac", 8, 16000, "s16"),
    # ogg: Opus (planar float), and Vorbis
    Media("ogg", "libopus", 1, 16000, "fltp"),
    Media("ogg", "vorbis", 2, 44100, "fltp", options=VORBIS),
    Media("ogg", "libopus", 3, 24000, "fltp"),
    Media("ogg", "libopus", 6, 48000, "fltp", separate=True),
    Media("ogg", "libopus", 8, 12000, "fltp"),
    Media("ogg", "libopus", 16, 16000, "fltp", options=OPUS_WIDE),
    Media("ogg", "libopus", 32, 8000, "fltp", options=OPUS_WIDE),
    Media("ogg", "libopus", 64, 8000, "fltp", options=OPUS_WIDE),
    # webm: Opus
    Media("webm", "libopus", 1, 8000, "fltp"),
    Media("webm", "libopus", 2, 48000, "fltp"),
    Media("webm", "libopus", 3, 16000, "fltp"),
    Media("webm", "libopus", 6, 24000, "fltp"),
    Media("webm", "libopus", 8, 48000, "fltp", separate=True),
    Media("webm", "libopus", 16, 12000, "fltp", options=OPUS_WIDE),
    Media("webm", "libopus", 32, 16000, "fltp", options=OPUS_WIDE),
    Media("webm", "libopus", 64, 16000, "fltp", options=OPUS_WIDE, seconds=1.0),
    # mp3: at most 2 channels (the format's own limit)
    Media("mp3", "libmp3lame", 1, 8000, "fltp"),
    Media("mp3", "libmp3lame", 2, 44100, "fltp"),
    # m4a: AAC and ALAC (at most 8 channels as FFmpeg encodes them); wider, PCM in a QuickTime
    # file, which the same demuxer reads
    Media("ipod", "aac", 1, 96000, "fltp"),
    Media("ipod", "alac", 2, 44100, "s16p", sample_format="s16p"),
    Media("ipod", "aac", 3, 8000, "fltp"),
    Media("ipod", "alac", 6, 22050, "s32p", sample_format="s32p"),
    Media("ipod", "aac", 8, 48000, "fltp"),
    Media("mov", "pcm_s16le", 16, 22050, "s16"),
    Media("mov", "pcm_f32le", 32, 8000, "flt"),
    Media("mov", "pcm_s32le", 64, 8000, "s32", seconds=1.0),
    # mkv: whatever it carries
    Media("matroska", "pcm_f64le", 1, 192000, "dbl"),
    Media("matroska", "aac", 2, 88200, "fltp"),
    Media("matroska", "flac", 3, 11025, "s16"),
    Media("matroska", "alac", 6, 16000, "s16p", sample_format="s16p", separate=True),
    Media("matroska", "aac", 8, 48000, "fltp"),
    Media("matroska", "pcm_s16le", 16, 96000, "s16"),
    Media("matroska", "libopus", 32, 48000, "fltp", options=OPUS_WIDE, seconds=1.0),
    Media("matroska", "pcm_f32le", 64, 11025, "flt", seconds=1.0),
]

CONTAINERS = {"wav", "flac", "ogg", "webm", "mp3", "ipod", "matroska"}
CHANNELS = {1, 2, 3, 6, 8, 16, 32, 64}
# What each container can carry at most, as FFmpeg encodes it (m4a: wider files go as .mov).
MOST_CHANNELS = {"flac": 8, "mp3": 2, "ipod": 8}
FORMATS = {"s16", "s32", "flt", "dbl", "s16p", "s32p", "fltp"}
RATES = {8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000}


class ServerProcess:
    """``python -m server serve`` on tiny.en, started again if it dies."""

    def __init__(self, model: Path, models_dir: Path, log: Path) -> None:
        self.model = model
        self.models_dir = models_dir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        env = {
            **os.environ,
            "WHISPER_MODEL": str(self.model),
            "WHISPER_MODELS_DIR": str(self.models_dir),
            "WHISPER_LOG_LEVEL": "warning",
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if requests.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def assert_alive(self, what: str) -> None:
        """The process runs and /health answers 200; if not, fail (a fresh one serves the
        next case)."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            health = requests.get(f"{self.url}/health", timeout=30)
            assert health.status_code == 200, (what, health.text)
            return
        tail = self.log.read_text(errors="replace")[-3000:]
        self.proc = None
        pytest.fail(f"the server died (exit status {code}) after {what}:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    proc = ServerProcess(tiny_model, tmp / "models", tmp / "server.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def post(server: ServerProcess, data: bytes, response_format: str, what: str) -> requests.Response:
    """Send one file; the server must answer it and still be up afterwards."""
    try:
        response = requests.post(
            f"{server.url}/v1/audio/transcriptions",
            files={"file": ("upload", data)},
            data={"model": "whisper-1", "response_format": response_format},
            timeout=300,
        )
    except requests.ConnectionError:
        server.assert_alive(what)  # fails with the server's last words if it died
        raise
    server.assert_alive(what)
    return response


def assert_answered(response: requests.Response, *, must_succeed: bool) -> None:
    if must_succeed or response.status_code == 200:
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body.get("text"), str), body
        return
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def damaged(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """A copy cut at 60 %, and one with 1 % of its bytes overwritten past the first 4 %."""
    rng = np.random.default_rng(seed)
    flipped = bytearray(data)
    start = len(data) // 25
    at = rng.integers(start, len(data), size=max(1, len(data) // 100))
    flipped_bytes = rng.integers(0, 256, size=len(at), dtype=np.uint8)
    for i, b in zip(at, flipped_bytes, strict=True):
        flipped[i] = int(b)
    return [("cut at 60%", data[: len(data) * 6 // 10]), ("overwritten", bytes(flipped))]


@pytest.mark.parametrize("media", CASES, ids=lambda m: m.name)
def test_every_format_decodes_and_nothing_takes_the_server_down(
    server: ServerProcess, media: Media
) -> None:
    server.ensure_running()
    data = media.encode()
    for response_format in ("json", "diarized_json"):
        response = post(server, data, response_format, f"{media.name} as {response_format}")
        assert_answered(response, must_succeed=True)
    # Diarized: decoding the whole file and measuring its channels, a superset of json's work.
    for what, bad in damaged(data, seed=len(data)):
        response = post(server, bad, "diarized_json", f"{media.name} {what}")
        assert_answered(response, must_succeed=False)


def test_the_cases_cover_every_dimension() -> None:
    """Every container with every channel count it can carry, every decoded sample format and
    every rate, as FFmpeg decodes the files (not as the table says)."""
    seen = set()
    rates = set()
    for media in CASES:
        fmt, channels, rate = decoded_format(media.encode())
        # Opus always decodes at 48 kHz; its rate is the input's, kept as metadata.
        wanted = 48000 if media.codec == "libopus" else media.rate
        assert (fmt, channels, rate) == (media.decoded, media.channels, wanted), media
        seen.add((media.container, channels))
        rates.add(rate)
    for container in CONTAINERS:
        for channels in CHANNELS:
            if channels <= MOST_CHANNELS.get(container, max(CHANNELS)):
                assert (container, channels) in seen, (container, channels)
    assert {(c, n) for c, n in seen if c == "mov"} == {("mov", n) for n in CHANNELS if n > 8}
    assert FORMATS <= {m.decoded for m in CASES}
    assert RATES <= rates
