"""What the benches share: a server of their own in a subprocess, a free port, Opus inputs,
and the error rates transcripts are scored with (the tests score with the same functions).

bench/ holds scripts, not a package: a script imports this module after putting its own folder
on ``sys.path`` (``python bench/x.py`` does that already); the tests import it as
``bench.harness``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Served:
    """A running server: its base URL and its process (for RSS and CPU times)."""

    url: str
    process: psutil.Process
    log: IO[str]

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        self.log.flush()
        with open(self.log.name) as fh:
            return fh.read()


@contextlib.contextmanager
def served(
    env: dict[str, str], *, root: Path = ROOT, ready_timeout: float = 300.0
) -> Iterator[Served]:
    """Run ``python -m server serve`` from ``root`` on a free loopback port until the block ends.

    Args:
        env: ``WHISPER_*`` settings on top of this process's environment.
        root: The checkout whose server runs (another one times older code).
        ready_timeout: Seconds to wait for ``/ready``.

    Raises:
        RuntimeError: the server exited or was not ready in time (with its log's tail).
    """
    port = free_port()
    # The log goes to a file: a pipe nobody reads would block the server once full.
    log = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port)],
        cwd=root,
        env={**os.environ, "WHISPER_HOST": "127.0.0.1", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        ready = False
        while not ready and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                ready = requests.get(url + "/ready", timeout=2).status_code == 200
            if not ready:
                time.sleep(0.3)
        if not ready:
            log.seek(0)
            raise RuntimeError("the server did not become ready:\n" + log.read()[-4000:])
        yield Served(url, psutil.Process(proc.pid), log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def encode_opus(samples: np.ndarray, path: Path) -> None:
    """16 kHz mono float32 -> Opus 32 kbit/s in Ogg, as a browser or a phone would send."""
    import av

    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000)
        stream.bit_rate = 32000
        stream.layout = "mono"
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        step = RATE * 10
        for start in range(0, len(samples), step):
            block = (np.clip(samples[start : start + step], -1, 1) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = RATE
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


# ---- scoring ---------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-case words (letters, digits and apostrophes), as WER counts them."""
    return re.findall(r"[\w']+", text.lower())


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between two token lists."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate (Levenshtein distance over words / reference length)."""
    ref = words(reference)
    return edit_distance(ref, words(hypothesis)) / max(1, len(ref))


def longest_loss(reference: str, hypothesis: str) -> int:
    """The longest run of consecutive reference words that the hypothesis lacks (deleted, or
    replaced by fewer words), in an alignment of the two: words lost at a cut show here, while
    a name spelled another way does not."""
    ref, hyp = words(reference), words(hypothesis)
    matcher = difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False)
    return max(
        (
            max(0, (i2 - i1) - (j2 - j1))
            for op, i1, i2, j1, j2 in matcher.get_opcodes()
            if op in ("delete", "replace")
        ),
        default=0,
    )


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate over letters and digits (for Chinese and Japanese)."""
    keep = re.compile(r"\w")
    ref = keep.findall(reference)
    return edit_distance(ref, keep.findall(hypothesis)) / max(1, len(ref))


# ---- recordings in several languages -------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One clip of a joined recording: its file, language and reference, and where it lies."""

    file: str
    language: str
    reference: str
    start: float
    end: float

    def error(self, hypothesis: str) -> float:
        """The clip's error: letters for Chinese and Japanese (in simplified characters),
        words otherwise."""
        if self.language in ("zh", "ja"):
            from opencc import OpenCC

            return cer(OpenCC("t2s").convert(self.reference), OpenCC("t2s").convert(hypothesis))
        return wer(self.reference, hypothesis)

    @property
    def one_error(self) -> float:
        """What one word (one letter in Chinese and Japanese) adds to :meth:`error`."""
        if self.language in ("zh", "ja"):
            return 1 / max(1, len(re.findall(r"\w", self.reference)))
        return 1 / max(1, len(words(self.reference)))


#: Seven clips in six languages, as a new user joined them (issue 26), and three in one window.
MIXED = (
    ("jfk.flac", "en"),
    ("es_mls_13697_11991_000000.opus", "es"),
    ("de_leopard_test_de.wav", "de"),
    ("fr_leopard_test_fr.wav", "fr"),
    ("ru_deepspeech_ru.wav", "ru"),
    ("zh_aishell_BAC009S0724W0121.wav", "zh"),
    ("en_leopard_test.wav", "en"),
)
ONE_WINDOW = (
    ("fr_leopard_test_fr.wav", "fr"),
    ("en_leopard_test.wav", "en"),
    ("de_leopard_test_de.wav", "de"),
)


def join_clips(
    folder: Path, clips: tuple[tuple[str, str], ...], pause: float = 0.7
) -> tuple[np.ndarray, list[Clip]]:
    """The clips decoded and joined with ``pause`` seconds of silence after each, and where
    each one lies in the result."""
    from faster_whisper.audio import decode_audio

    pieces: list[np.ndarray] = []
    placed: list[Clip] = []
    at = 0
    gap = np.zeros(round(pause * RATE), np.float32)
    for name, language in clips:
        audio = decode_audio(str(folder / name))
        reference = (folder / name).with_suffix(".txt").read_text().strip()
        placed.append(Clip(name, language, reference, at / RATE, (at + len(audio)) / RATE))
        pieces += [audio, gap]
        at += len(audio) + len(gap)
    return np.concatenate(pieces), placed


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz mono float samples as a 16-bit WAV file."""
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()
