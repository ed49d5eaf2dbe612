"""Cross-request batching: worker threads decode the 30 s windows of many requests in batches.

A GPU that serves many clients sits idle when requests run one at a time, and running them in
parallel threads multiplies the memory each one holds. The :class:`Scheduler` sits in front of
one model instead. :meth:`Scheduler.submit` cuts a request's audio into windows much as
faster-whisper's ``BatchedInferencePipeline.transcribe`` does (Silero VAD, then speech packed
into windows of at most ``chunk_length`` seconds; :mod:`server.whisper.cutting` says where they
differ), computes their features in the caller's
thread and queues them. A worker thread takes up to ``max_batch(key)`` windows from any number
of requests, runs encode + generate (+ align, for windows that asked for word timestamps) as one
batch, and routes each result to its request's :class:`Ticket`, which yields faster-whisper
``Segment`` objects in time order with times in seconds from the start of the submitted audio.

What may differ inside one batch, and what may not:

- Per window (per batch item): language, task, initial prompt and hotwords. They only change the
  prompt, and CTranslate2's ``generate`` takes one prompt per item. A request without a language
  on a multilingual model has it detected on its first window's encoder output, inside the batch
  that decodes that window; its other windows wait for the answer.
- Per batch: what CTranslate2 takes once per call (beam size, sampling temperature, penalties,
  suppressed tokens) and whether words are aligned. These make up the :class:`BatchKey`; only
  windows with equal keys share a batch.

Which request leads the next batch is the scheduling policy's choice
(:mod:`server.batching.policy`): live decodes first, then short requests, then the windows of
long files, round-robin within a class, and no request waits past the policy's starvation bound.

A request may also be decoded outside the queue, in the thread that iterates its ticket
(:meth:`Scheduler.decode`, for a caller with a slot of its own): window by window through the
same steps, a batch of one. On the CPUs measured a window's result does not depend on the batch
it is in, so the text does not depend on the path.

The windows of one batch are decoded by :class:`server.batching.windowed.WindowDecoder`; the
requests waiting, which leads the next batch and which windows it takes are
:class:`server.batching.queue.WindowQueue`'s; a request's windows and its ticket are in
:mod:`server.batching.windows`, the options in :mod:`server.batching.options`, what sizes each
batch in :mod:`server.batching.budget`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import numpy as np

from server.batching.budget import BatchBudget, CallableBudget
from server.batching.options import BatchKey, WindowOptions
from server.batching.policy import SchedulingPolicy, WorkClass
from server.batching.queue import Counters, SchedulerStats, WindowQueue
from server.batching.windowed import WindowDecoder
from server.batching.windows import (
    BatchFailedError,
    QueuedRequest,
    QueueFullError,
    SchedulerClosedError,
    SchedulerError,
    Ticket,
    Window,
)
from server.whisper.runner import TEMPERATURES, WhisperRunner

logger = logging.getLogger(__name__)


class Scheduler:
    """Batches the windows of concurrent requests through one model with its worker threads.

    Args:
        model: A loaded ``faster_whisper.WhisperModel``, or the :class:`WhisperRunner` that
            wraps it. The scheduler is its only user for the requests it runs; nothing else
            should decode with it meanwhile if memory matters.
        budget: Sizes each batch and is held around it (see :class:`BatchBudget`).
        max_batch, around_batch: Instead of ``budget``, the same as two callables (see
            :class:`CallableBudget`).
        max_wait_s: How long the oldest window waits for others to fill a batch; bounds the
            latency a lone request pays.
        max_queued_windows: :meth:`submit` raises :class:`QueueFullError` when more windows
            than this would be waiting.
        policy: Which request goes first (the defaults of :class:`SchedulingPolicy` if None).
        workers: How many batches run at the same time, each on its own worker thread (and,
            for them to overlap, its own CTranslate2 replica). On the CPU two batches side by
            side finish sooner than one of twice the size; each is sized and reserved by the
            budget on its own.
    """

    def __init__(
        self,
        model: Any,
        *,
        budget: BatchBudget | None = None,
        max_batch: Callable[[BatchKey], int] | None = None,
        max_wait_s: float = 0.02,
        max_queued_windows: int = 1024,
        around_batch: Callable[[BatchKey, int], AbstractContextManager[object]] | None = None,
        policy: SchedulingPolicy | None = None,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if max_queued_windows < 1:
            raise ValueError("max_queued_windows must be at least 1")
        if (budget is None) == (max_batch is None):
            raise ValueError("give the scheduler either a budget or max_batch")
        self._runner = model if isinstance(model, WhisperRunner) else WhisperRunner(model)
        if budget is None:
            assert max_batch is not None
            budget = CallableBudget(max_batch, around_batch)
        self._budget = budget
        self._queue = WindowQueue(
            policy or SchedulingPolicy(),
            Counters(),
            max_wait_s=max_wait_s,
            max_queued_windows=max_queued_windows,
        )
        # The queue's lock, which the requests' tickets and the decoder's language reader share.
        self._lock = self._queue.lock
        self._choosing = threading.Lock()  # held by the worker choosing its next batch
        self._decoder = WindowDecoder(self._runner, self._queue.wake)
        self._workers = [
            threading.Thread(target=self._run, name=f"whisper-batch-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    # ---- public ---------------------------------------------------------------------------

    def submit(
        self,
        audio: np.ndarray,
        options: WindowOptions | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> Ticket:
        """Cut ``audio`` into windows and queue them (VAD and features run in this thread).

        Args:
            audio: 16 kHz mono float32 samples.
            options: The request's options; the defaults when ``None``.
            cancelled: Set it when the client goes away; the request's queued windows are
                dropped at the next batch and the ticket raises :class:`RequestCancelledError`.

        Returns:
            The ticket to iterate for segments.

        Raises:
            QueueFullError: more than ``max_queued_windows`` windows would be waiting.
            SchedulerClosedError: :meth:`close` was called.
            ValueError: an unknown language, or a prompt that leaves no room to decode.
        """
        self._queue.check_room()
        request = self._decoder.cut(
            audio, options or WindowOptions(), cancelled, self._lock, self._queue.notify
        )
        self._queue.admit(request)
        return request.ticket

    def decode(
        self,
        audio: np.ndarray,
        options: WindowOptions | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> Ticket:
        """Like :meth:`submit`, but the windows are decoded in the thread that iterates the
        ticket, one at a time, and never queued: for a caller that holds a slot of its own.
        Like a batch, it gives way to a final live decode running beside it, before each
        window and between its steps (see :mod:`server.batching.policy`).

        Each window goes through the very steps a batch runs (a batch of one), so the segments
        are those the request would get in any batch: the same input gives the same text
        whichever path it took. Errors from the model are raised as they are.
        """
        request = self._decoder.cut(
            audio, options or WindowOptions(), cancelled, self._lock, self._queue.notify
        )
        request.inline = True
        ticket = request.ticket
        if not request.total:
            with self._lock:
                ticket._finish()
            return ticket

        queue = self._queue

        def drive() -> None:
            queue.pause(request.work_class)  # a final live decode beside it goes first
            with self._lock:
                queue.check_open()
                window = request.pending.pop(0) if request.pending else None
                if window is not None:
                    request.in_flight += 1
                    queue.inline[request.work_class] += 1
            if window is None:
                raise RuntimeError("no window left to decode for an unfinished request")
            try:
                self._decode(window.key, [window], partial(queue.pause, request.work_class))
            finally:
                with self._lock:
                    queue.inline[request.work_class] -= 1
                    queue.wake.notify_all()  # a batch held back for it may go now

        ticket._drive = drive
        return ticket

    def ready(self, key: BatchKey, lead: WorkClass = WorkClass.LONG) -> int:
        """How many queued windows with ``key`` could join a batch led by class ``lead`` now."""
        with self._lock:
            return len(self._queue.ready(key, lead))

    def stats(self) -> SchedulerStats:
        """A snapshot of the counters."""
        queue = self._queue
        with self._lock:
            return queue.counts.snapshot(queue.requests, queue.queued, queue.inline)

    def close(self, timeout: float | None = None) -> None:
        """Stop the workers after the batches they are running; unfinished requests get
        :class:`SchedulerClosedError`. Idempotent."""
        self._queue.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._queue.close(SchedulerClosedError("The scheduler was closed."))

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # One worker at a time chooses, sizes and takes its batch (the decoding runs side
            # by side): a second worker then sizes its batch for the windows left, and never
            # plans (and reserves) for windows the first one takes.
            with self._choosing:
                lead = self._queue.next_lead()
                if lead is None:
                    return
                key, work_class = lead
                ready = self.ready(key, work_class)
                try:
                    limit = max(1, int(self._budget.max_batch(key, ready)))
                except Exception as exc:
                    logger.warning(
                        "max_batch(%s) raised %r; failing the requests it held", key, exc
                    )
                    self._queue.stop_key(key, _batch_failed(exc, 0))
                    continue
                # Every batch max_batch sized runs under the budget's scope, even one that
                # finds no window left to take (size 0): that scope is where what max_batch
                # reserved goes.
                size = balanced(limit, ready, len(self._workers))
                windows = self._queue.fill(key, size, work_class)
            try:
                with self._budget.batch(key, len(windows)):
                    if windows:
                        batch_class = min(w.request.work_class for w in windows)
                        self._decode(key, windows, pause=partial(self._queue.pause, batch_class))
            except Exception as exc:  # the worker must survive anything a batch raises
                if windows:
                    self._fail_batch(windows, exc)
                else:
                    logger.warning("closing an empty batch raised %r", exc)

    def _fail_batch(self, windows: list[Window], exc: Exception) -> None:
        requests = list({id(w.request): w.request for w in windows}.values())
        logger.warning(
            "a batch of %d windows from %d requests failed: %s: %s",
            len(windows),
            len(requests),
            type(exc).__name__,
            exc,
        )
        with self._lock:
            self._queue.counts.failed += 1
            for request in requests:
                request.in_flight = 0
                if not request.closed:
                    self._queue.stop(request, _batch_failed(exc, len(windows)))

    # ---- decoding -------------------------------------------------------------------------

    def _decode(
        self, key: BatchKey, windows: list[Window], pause: Callable[[], None] | None = None
    ) -> None:
        """Run one batch (the decoder's work; ``pause`` between its steps), then requeue the
        windows that fall back to their next temperature and hand the finished ones to their
        requests, in order."""
        outcome = self._decoder.run(key, windows, pause)
        with self._lock:
            for w in outcome.retry:
                self._queue.requeue(w)
            for w, decoded in outcome.finished:
                w.request.in_flight -= 1
                w.features = np.empty((0, 0), dtype=np.float32)  # free it; the result stays
                w.request.decoded[w.index] = decoded
            ready = list({id(w.request): w.request for w, _ in outcome.finished}.values())
        for request in ready:
            self._release(request)

    def _release(self, request: QueuedRequest) -> None:
        """Turn the request's finished windows into segments and hand them to its ticket,
        strictly in window order (word times depend on the window before)."""
        while True:
            with self._lock:
                if request.closed:
                    return
                decoded = request.decoded.pop(request.released, None)
            if decoded is None:
                return
            segments = self._decoder.segments(request, decoded)
            with self._lock:
                if request.closed:
                    return
                request.released += 1
                request.ticket._push(segments)
                if request.released == request.total:
                    self._queue.finish(request)


def balanced(limit: int, ready: int, workers: int) -> int:
    """The size of the next batch, so that ``ready`` windows spread evenly over ``workers``
    workers in as few rounds as batches of ``limit`` allow: with 10 ready, batches of at most 4
    and two workers, 3, 4, 2, 1 (each worker decodes 5) rather than 4, 4, 2 (6 on one of them,
    the other idle meanwhile). One worker, or nothing ready yet: ``limit``."""
    if workers < 2 or ready < 1:
        return limit
    batches = workers * math.ceil(ready / (workers * limit))
    return max(1, min(limit, math.ceil(ready / batches)))


def _batch_failed(exc: Exception, size: int) -> BatchFailedError:
    what = f"a batch of {size} windows" if size else "planning a batch"
    error = BatchFailedError(f"{what} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


__all__ = [
    "TEMPERATURES",
    "BatchBudget",
    "BatchFailedError",
    "BatchKey",
    "CallableBudget",
    "QueueFullError",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerError",
    "SchedulerStats",
    "SchedulingPolicy",
    "Ticket",
    "WindowOptions",
    "WorkClass",
    "balanced",
]
