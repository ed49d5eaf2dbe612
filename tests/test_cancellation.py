"""Cancellation: nothing a cancelled request held outlives it.

The engine's reservations for a piece and a batch's share of memory are owned by scopes that
close on every exit (the engine's ``with`` blocks, the scheduler's pairing of ``max_batch``
with ``around_batch``). These tests cancel requests where each is held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from faster_whisper import WhisperModel

from server.audio import decode_audio
from server.errors import RequestCancelledError
from server.job import Job
from server.scheduler import BatchKey, Scheduler, WindowOptions
from tests.conftest import make_engine

SR = 16000
LONG = "en_ljspeech_LJ001-0001_to_0032_concat.flac"  # 231 s: many windows, several batches


# ---- the scheduler and the engine --------------------------------------------------------------


def test_a_batch_sized_for_cancelled_windows_still_closes_its_scope(
    tiny_model: Path, data_dir: Path
) -> None:
    """The client goes while its batch is being sized (the engine reserves for the batch in
    ``max_batch``): no window is left to take, and the batch's scope still opens and closes
    (size 0), so what ``max_batch`` reserved is given back."""
    audio = decode_audio((data_dir / "jfk.flac").read_bytes(), max_duration=60).samples
    gone = threading.Event()
    opened: list[BatchKey] = []
    closed: list[int] = []

    def max_batch(key: BatchKey) -> int:
        opened.append(key)
        gone.set()  # the client goes while the batch is planned (waiting for memory, say)
        return 4

    @contextmanager
    def around_batch(key: BatchKey, size: int) -> Iterator[None]:
        yield
        closed.append(size)

    tiny = WhisperModel(str(tiny_model), device="cpu", compute_type="int8")
    options = WindowOptions(beam_size=1, temperatures=(0.0,))
    with Scheduler(tiny, max_batch=max_batch, around_batch=around_batch) as scheduler:
        ticket = scheduler.submit(audio, options, cancelled=gone)
        with pytest.raises(RequestCancelledError):
            list(ticket)
        deadline = time.monotonic() + 10
        while len(closed) < len(opened) and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = scheduler.stats()
    assert opened and closed == [0] * len(opened), (opened, closed)
    assert stats.batches == 0 and stats.queued_windows == 0
    assert stats.cancelled_windows == ticket.windows


def test_the_engine_releases_a_batch_planned_for_a_cancelled_request(
    tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    """The engine's side of the same moment: its batch reservation (taken in ``_max_batch``,
    handed to ``_around_batch``) is released, not left in the ledger for good."""
    engine = make_engine(tiny_model, tmp_path, batching="on", batch_size=2)
    try:
        cancelled = threading.Event()
        plan_batch = engine._max_batch

        def max_batch(model: Any, key: BatchKey) -> int:
            size = plan_batch(model, key)
            cancelled.set()  # reserved for the batch; now the client goes
            return size

        engine._max_batch = max_batch  # type: ignore[method-assign]
        audio = decode_audio((data_dir / LONG).read_bytes(), max_duration=3600).samples
        assert engine.served is not None
        job = Job(request_id="gone", audio=audio[: 90 * SR], source=engine.served)
        with pytest.raises(RequestCancelledError):
            engine.run(job, cancelled=cancelled)
        deadline = time.monotonic() + 10
        while engine.reservations.snapshot() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.reservations.snapshot() == []
        assert engine.memory_report()["requests"]["queued_windows"] == 0
    finally:
        engine.close()
