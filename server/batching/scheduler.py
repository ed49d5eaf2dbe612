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

The windows of one batch are decoded by :class:`server.batching.windowed.WindowDecoder`;
a request's windows and its ticket are in :mod:`server.batching.windows`, the options in
:mod:`server.batching.options`, what sizes each batch in :mod:`server.batching.budget`.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from server.batching.budget import BatchBudget, CallableBudget
from server.batching.options import BatchKey, WindowOptions
from server.batching.policy import ClassStats, SchedulingPolicy, Waits, WorkClass
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
from server.errors import RequestCancelledError
from server.whisper.runner import TEMPERATURES, WhisperRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerStats:
    """Counters for /metrics. Batch sizes count windows, fallback re-runs included.

    Attributes:
        queued_windows: Windows waiting for a batch now.
        active_requests: Requests submitted and not yet finished, failed or cancelled.
        batches: Batches run (failed ones included).
        windows: Windows decoded.
        mixed_batches: Batches that held windows of more than one request.
        batch_sizes: How many batches had each size.
        fallbacks: Windows sent back to the queue at a higher temperature.
        failed_batches: Batches that raised.
        cancelled_windows: Queued windows dropped because their request was cancelled.
        rejected: Submissions refused because the queue was full.
        classes: Per class of work (:class:`WorkClass`'s label): its queue and waits.
        held_seconds: How long the workers held back their batches for live decodes running
            outside the queue (summed over the workers).
    """

    queued_windows: int
    active_requests: int
    batches: int
    windows: int
    mixed_batches: int
    batch_sizes: Mapping[int, int]
    fallbacks: int
    failed_batches: int
    cancelled_windows: int
    rejected: int
    classes: Mapping[str, ClassStats]
    held_seconds: float

    @property
    def mean_batch_size(self) -> float:
        return self.windows / self.batches if self.batches else 0.0


@dataclass
class _Counters:
    """The worker's running counts (under the scheduler's lock); see :class:`SchedulerStats`."""

    batches: int = 0
    windows: int = 0
    mixed: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    fallbacks: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    held: float = 0.0
    waits: Waits = field(default_factory=Waits)

    def batch(self, windows: list[Window]) -> None:
        self.batches += 1
        self.windows += len(windows)
        self.sizes[len(windows)] += 1
        if len({id(w.request) for w in windows}) > 1:
            self.mixed += 1

    def snapshot(
        self, requests: deque[QueuedRequest], queued: int, inline: Counter[WorkClass]
    ) -> SchedulerStats:
        by_class: Counter[WorkClass] = Counter()
        for r in requests:
            by_class[r.work_class] += len(r.pending)
        return SchedulerStats(
            queued_windows=queued,
            active_requests=len(requests),
            batches=self.batches,
            windows=self.windows,
            mixed_batches=self.mixed,
            batch_sizes=dict(sorted(self.sizes.items())),
            fallbacks=self.fallbacks,
            failed_batches=self.failed,
            cancelled_windows=self.cancelled,
            rejected=self.rejected,
            classes={c.label: self.waits.stats(c, by_class[c], inline[c]) for c in WorkClass},
            held_seconds=self.held,
        )


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
        self._policy = policy or SchedulingPolicy()
        self._inline: Counter[WorkClass] = Counter()  # decodes running in callers' threads
        self._counts = _Counters()
        self._max_wait = max_wait_s
        self._max_queued = max_queued_windows
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._choosing = threading.Lock()  # held by the worker choosing its next batch
        # Round-robin order: the least recently served first.
        self._requests: deque[QueuedRequest] = deque()
        self._queued = 0
        self._closed = False
        self._decoder = WindowDecoder(self._runner, self._wake)
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
        with self._lock:
            self._check_open()
            if self._queued >= self._max_queued:  # refuse before spending time on VAD
                self._counts.rejected += 1
                raise QueueFullError(self._queued, None, self._max_queued)
        request = self._decoder.cut(
            audio, options or WindowOptions(), cancelled, self._lock, self._notify
        )
        with self._lock:
            self._check_open()
            if self._queued + request.total > self._max_queued:
                self._counts.rejected += 1
                raise QueueFullError(self._queued, request.total, self._max_queued)
            if not request.total:
                request.ticket._finish()
                return request.ticket
            self._queued += request.total
            self._requests.append(request)
            self._wake.notify_all()
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
            audio, options or WindowOptions(), cancelled, self._lock, self._notify
        )
        request.inline = True
        ticket = request.ticket
        if not request.total:
            with self._lock:
                ticket._finish()
            return ticket

        def drive() -> None:
            self._pause(request.work_class)  # a final live decode beside it goes first
            with self._lock:
                self._check_open()
                window = request.pending.pop(0) if request.pending else None
                if window is not None:
                    request.in_flight += 1
                    self._inline[request.work_class] += 1
            if window is None:
                raise RuntimeError("no window left to decode for an unfinished request")
            try:
                self._decode(window.key, [window], partial(self._pause, request.work_class))
            finally:
                with self._lock:
                    self._inline[request.work_class] -= 1
                    self._wake.notify_all()  # a batch held back for it may go now

        ticket._drive = drive
        return ticket

    def ready(self, key: BatchKey, lead: WorkClass = WorkClass.LONG) -> int:
        """How many queued windows with ``key`` could join a batch led by class ``lead`` now."""
        with self._lock:
            return len(self._ready(key, lead))

    def stats(self) -> SchedulerStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._counts.snapshot(self._requests, self._queued, self._inline)

    def close(self, timeout: float | None = None) -> None:
        """Stop the workers after the batches they are running; unfinished requests get
        :class:`SchedulerClosedError`. Idempotent."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            while self._requests:
                self._stop(self._requests[0], SchedulerClosedError("The scheduler was closed."))

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- submitting -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerClosedError("The scheduler is closed; it takes no more requests.")

    def _notify(self) -> None:
        with self._lock:
            self._wake.notify_all()

    # ---- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # One worker at a time chooses, sizes and takes its batch (the decoding runs side
            # by side): a second worker then sizes its batch for the windows left, and never
            # plans (and reserves) for windows the first one takes.
            with self._choosing:
                lead = self._next_key()
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
                    with self._lock:
                        for request in [
                            r for r in self._requests if any(w.key == key for w in r.eligible())
                        ]:
                            self._stop(request, _batch_failed(exc, 0))
                    continue
                # Every batch max_batch sized runs under the budget's scope, even one that
                # finds no window left to take (size 0): that scope is where what max_batch
                # reserved goes.
                windows = self._fill(key, balanced(limit, ready, len(self._workers)), work_class)
            try:
                with self._budget.batch(key, len(windows)):
                    if windows:
                        batch_class = min(w.request.work_class for w in windows)
                        self._decode(key, windows, pause=partial(self._pause, batch_class))
            except Exception as exc:  # the worker must survive anything a batch raises
                if windows:
                    self._fail_batch(windows, exc)
                else:
                    logger.warning("closing an empty batch raised %r", exc)

    def _next_key(self) -> tuple[BatchKey, WorkClass] | None:
        """Wait for a window that may lead a batch (the policy's choice) and for no live decode
        outside the queue to hold it back; the key and class of the batch to size next (None
        once the scheduler is closed)."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                self._drop_cancelled()
                now = time.monotonic()
                lead = self._policy.lead([r for r in self._requests if r.eligible()], now)
                if lead is None:
                    self._wake.wait()
                    continue
                if not self._holding(lead.work_class) or self._policy.overdue(lead, now):
                    return lead.eligible()[0].key, lead.work_class
                self._wake.wait(self._policy.until_overdue(lead, now))
                self._counts.held += time.monotonic() - now

    def _holding(self, work_class: WorkClass) -> bool:
        """Whether a decode running outside the queue holds back batches of ``work_class``."""
        return any(n and self._policy.holds(c, work_class) for c, n in self._inline.items())

    def _pause(self, work_class: WorkClass) -> None:
        """Before or between the steps of a decode of ``work_class`` (a batch, or a window
        decoded inline): wait while a live decode outside the queue holds it back, at most the
        policy's starvation bound."""
        with self._lock:
            began = time.monotonic()
            deadline = began + self._policy.starvation_s
            while not self._closed and self._holding(work_class):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            self._counts.held += time.monotonic() - began

    def _ready(self, key: BatchKey, lead: WorkClass) -> list[Window]:
        """Queued windows with ``key`` that may join a batch led by class ``lead`` now."""
        joins = self._policy.joins
        return [
            w
            for r in self._requests
            if joins(lead, r.work_class)
            for w in r.eligible()
            if w.key == key
        ]

    def _fill(self, key: BatchKey, limit: int, lead: WorkClass) -> list[Window]:
        """Wait (at most ``max_wait_s`` after the oldest window) for ``limit`` windows with
        ``key``, and take them, round-robin over requests. Empty when none is left by then:
        their requests were cancelled, or the scheduler closed."""
        with self._lock:
            while not self._closed:
                self._drop_cancelled()
                ready = self._ready(key, lead)
                if not ready:
                    break
                wait = min(w.queued_at for w in ready) + self._max_wait - time.monotonic()
                if len(ready) >= limit or wait <= 0:
                    break
                self._wake.wait(wait)
            if self._closed:
                return []
            windows = self._take(key, limit, lead)
            if windows:
                self._counts.batch(windows)
            return windows

    def _take(self, key: BatchKey, limit: int, lead: WorkClass) -> list[Window]:
        """Up to ``limit`` windows with ``key`` that may join a batch led by ``lead``, group by
        group in the policy's order (the overdue, then each class); within a group one window
        from each request in turn, the least recently served first, so one long upload does
        not starve short ones."""
        now = time.monotonic()
        joining = [
            r
            for r in self._requests
            if self._policy.joins(lead, r.work_class) and any(w.key == key for w in r.eligible())
        ]
        taken = _round_robin(self._policy.order(joining, now), key, limit)
        served = list({id(w.request): w.request for w in taken}.values())
        for window in taken:
            window.request.pending.remove(window)
            window.request.in_flight += 1
            self._counts.waits.record(window.request.work_class, now - window.queued_at)
            if not window.request.pending:
                window.request.ticket._drain()
        for request in self._requests:
            if any(request is r for r in served):
                request.skipped, request.waiting_since = 0, now
            elif request.eligible():
                request.skipped += 1
        for request in served:
            self._requests.remove(request)
            self._requests.append(request)
        self._queued -= len(taken)
        return taken

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._requests if r.ticket.cancelled.is_set() or r.ticket._withdrawn]
        for request in gone:
            self._counts.cancelled += len(request.pending)
            logger.info(
                "request cancelled; dropped %d queued windows of %d",
                len(request.pending),
                request.total,
            )
            self._stop(request, RequestCancelledError("The request was cancelled."))

    def _stop(self, request: QueuedRequest, error: BaseException) -> None:
        """End ``request`` with ``error`` (lock held): drop its queued windows."""
        self._queued -= len(request.pending)
        request.pending.clear()
        request.closed = True
        if request in self._requests:
            self._requests.remove(request)
        request.ticket._fail(error)

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
            self._counts.failed += 1
            for request in requests:
                request.in_flight = 0
                if not request.closed:
                    self._stop(request, _batch_failed(exc, len(windows)))

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
                w.fall_back()
                w.queued_at = time.monotonic()
                w.request.in_flight -= 1
                if not w.request.closed:
                    bisect.insort(w.request.pending, w, key=lambda x: x.index)
                    self._queued += 0 if w.request.inline else 1
                    self._counts.fallbacks += 1
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
                    request.closed = True
                    if request in self._requests:
                        self._requests.remove(request)
                    request.ticket._finish()


def balanced(limit: int, ready: int, workers: int) -> int:
    """The size of the next batch, so that ``ready`` windows spread evenly over ``workers``
    workers in as few rounds as batches of ``limit`` allow: with 10 ready, batches of at most 4
    and two workers, 3, 4, 2, 1 (each worker decodes 5) rather than 4, 4, 2 (6 on one of them,
    the other idle meanwhile). One worker, or nothing ready yet: ``limit``."""
    if workers < 2 or ready < 1:
        return limit
    batches = workers * math.ceil(ready / (workers * limit))
    return max(1, min(limit, math.ceil(ready / batches)))


def _round_robin(groups: list[list[QueuedRequest]], key: BatchKey, limit: int) -> list[Window]:
    """Up to ``limit`` eligible windows with ``key``, group after group; within a group one
    window from each request in turn, in the group's order."""
    taken: list[Window] = []
    for group in groups:
        queues = [[w for w in r.eligible() if w.key == key] for r in group]
        while len(taken) < limit and any(queues):
            for queue in queues:
                if queue and len(taken) < limit:
                    taken.append(queue.pop(0))
    return taken


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
