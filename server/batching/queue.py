"""The requests whose windows wait for a batch (:class:`WindowQueue`): admitting them, choosing
which leads the next batch and taking its windows in the policy's order, holding batches back
while a live decode runs outside the queue, and dropping what was cancelled. Everything here
runs under the queue's one lock, which the :class:`~server.batching.scheduler.Scheduler` and the
requests' tickets share.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.batching.options import BatchKey
from server.batching.policy import ClassStats, SchedulingPolicy, Waits, WorkClass
from server.batching.windows import QueuedRequest, QueueFullError, SchedulerClosedError, Window
from server.errors import RequestCancelledError

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
class Counters:
    """The workers' running counts (under the queue's lock); see :class:`SchedulerStats`."""

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


class WindowQueue:
    """Queued requests, least recently served first, and the lock they are guarded by.

    Args:
        policy: Which request leads a batch and which may join it.
        counts: The scheduler's counters (rejected, cancelled, held, waits, batches).
        max_wait_s: How long the oldest window waits for others to fill a batch.
        max_queued_windows: More windows than this are never waiting at once.
    """

    def __init__(
        self,
        policy: SchedulingPolicy,
        counts: Counters,
        *,
        max_wait_s: float,
        max_queued_windows: int,
    ) -> None:
        self.policy = policy
        self.counts = counts
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.requests: deque[QueuedRequest] = deque()
        self.queued = 0  # windows waiting in requests' pending lists (not inline ones)
        self.closed = False
        self.inline: Counter[WorkClass] = Counter()  # decodes running in callers' threads
        self._max_wait = max_wait_s
        self._max_queued = max_queued_windows

    # ---- admitting (lock not held) --------------------------------------------------------

    def check_room(self) -> None:
        """Raise before a request is cut when the queue is full or closed."""
        with self.lock:
            self.check_open()
            if self.queued >= self._max_queued:  # refuse before spending time on VAD
                self.counts.rejected += 1
                raise QueueFullError(self.queued, None, self._max_queued)

    def admit(self, request: QueuedRequest) -> None:
        """Queue a cut request's windows (a request with none is finished at once).

        Raises:
            QueueFullError: its windows would pass ``max_queued_windows``.
            SchedulerClosedError: the scheduler was closed.
        """
        with self.lock:
            self.check_open()
            if self.queued + request.total > self._max_queued:
                self.counts.rejected += 1
                raise QueueFullError(self.queued, request.total, self._max_queued)
            if not request.total:
                request.ticket._finish()
                return
            self.queued += request.total
            self.requests.append(request)
            self.wake.notify_all()

    def notify(self) -> None:
        with self.lock:
            self.wake.notify_all()

    def check_open(self) -> None:
        if self.closed:
            raise SchedulerClosedError("The scheduler is closed; it takes no more requests.")

    # ---- choosing the next batch ----------------------------------------------------------

    def next_lead(self) -> tuple[BatchKey, WorkClass] | None:
        """Wait for a window that may lead a batch (the policy's choice) and for no live decode
        outside the queue to hold it back; the key and class of the batch to size next (None
        once the queue is closed)."""
        with self.lock:
            while True:
                if self.closed:
                    return None
                self.drop_cancelled()
                now = time.monotonic()
                lead = self.policy.lead([r for r in self.requests if r.eligible()], now)
                if lead is None:
                    self.wake.wait()
                    continue
                if not self.holding(lead.work_class) or self.policy.overdue(lead, now):
                    return lead.eligible()[0].key, lead.work_class
                self.wake.wait(self.policy.until_overdue(lead, now))
                self.counts.held += time.monotonic() - now

    def holding(self, work_class: WorkClass) -> bool:
        """Whether a decode running outside the queue holds back batches of ``work_class``
        (lock held)."""
        return any(n and self.policy.holds(c, work_class) for c, n in self.inline.items())

    def pause(self, work_class: WorkClass) -> None:
        """Before or between the steps of a decode of ``work_class`` (a batch, or a window
        decoded inline): wait while a live decode outside the queue holds it back, at most the
        policy's starvation bound."""
        with self.lock:
            began = time.monotonic()
            deadline = began + self.policy.starvation_s
            while not self.closed and self.holding(work_class):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wake.wait(left)
            self.counts.held += time.monotonic() - began

    def ready(self, key: BatchKey, lead: WorkClass) -> list[Window]:
        """Queued windows with ``key`` that may join a batch led by class ``lead`` now (lock
        held)."""
        joins = self.policy.joins
        return [
            w
            for r in self.requests
            if joins(lead, r.work_class)
            for w in r.eligible()
            if w.key == key
        ]

    def fill(self, key: BatchKey, limit: int, lead: WorkClass) -> list[Window]:
        """Wait (at most ``max_wait_s`` after the oldest window) for ``limit`` windows with
        ``key``, and take them, round-robin over requests. Empty when none is left by then:
        their requests were cancelled, or the queue closed."""
        with self.lock:
            while not self.closed:
                self.drop_cancelled()
                ready = self.ready(key, lead)
                if not ready:
                    break
                wait = min(w.queued_at for w in ready) + self._max_wait - time.monotonic()
                if len(ready) >= limit or wait <= 0:
                    break
                self.wake.wait(wait)
            if self.closed:
                return []
            windows = self._take(key, limit, lead)
            if windows:
                self.counts.batch(windows)
            return windows

    def _take(self, key: BatchKey, limit: int, lead: WorkClass) -> list[Window]:
        """Up to ``limit`` windows with ``key`` that may join a batch led by ``lead``, group by
        group in the policy's order (the overdue, then each class); within a group one window
        from each request in turn, the least recently served first, so one long upload does
        not starve short ones."""
        now = time.monotonic()
        joining = [
            r
            for r in self.requests
            if self.policy.joins(lead, r.work_class) and any(w.key == key for w in r.eligible())
        ]
        taken = _round_robin(self.policy.order(joining, now), key, limit)
        served = list({id(w.request): w.request for w in taken}.values())
        for window in taken:
            window.request.pending.remove(window)
            window.request.in_flight += 1
            self.counts.waits.record(window.request.work_class, now - window.queued_at)
            if not window.request.pending:
                window.request.ticket._drain()
        for request in self.requests:
            if any(request is r for r in served):
                request.skipped, request.waiting_since = 0, now
            elif request.eligible():
                request.skipped += 1
        for request in served:
            self.requests.remove(request)
            self.requests.append(request)
        self.queued -= len(taken)
        return taken

    # ---- windows back, requests ended ------------------------------------------------------

    def requeue(self, window: Window) -> None:
        """A window falling back to its next temperature goes back in its request's place
        (lock held)."""
        request = window.request
        window.fall_back()
        window.queued_at = time.monotonic()
        request.in_flight -= 1
        if not request.closed:
            bisect.insort(request.pending, window, key=lambda w: w.index)
            self.queued += 0 if request.inline else 1
            self.counts.fallbacks += 1

    def finish(self, request: QueuedRequest) -> None:
        """Every window of ``request`` is out: it leaves the queue (lock held)."""
        request.closed = True
        if request in self.requests:
            self.requests.remove(request)
        request.ticket._finish()

    def stop_key(self, key: BatchKey, error: BaseException) -> None:
        """End every request with a window waiting for a batch with ``key``."""
        with self.lock:
            for request in [r for r in self.requests if any(w.key == key for w in r.eligible())]:
                self.stop(request, error)

    def close(self, error: BaseException | None = None) -> None:
        """Take no more requests and wake every waiting worker; with ``error``, end every
        queued request with it."""
        with self.lock:
            self.closed = True
            self.wake.notify_all()
            while error is not None and self.requests:
                self.stop(self.requests[0], error)

    # ---- ending requests (lock held) ------------------------------------------------------

    def drop_cancelled(self) -> None:
        gone = [r for r in self.requests if r.ticket.cancelled.is_set() or r.ticket._withdrawn]
        for request in gone:
            self.counts.cancelled += len(request.pending)
            logger.info(
                "request cancelled; dropped %d queued windows of %d",
                len(request.pending),
                request.total,
            )
            self.stop(request, RequestCancelledError("The request was cancelled."))

    def stop(self, request: QueuedRequest, error: BaseException) -> None:
        """End ``request`` with ``error``: drop its queued windows."""
        self.queued -= len(request.pending)
        request.pending.clear()
        request.closed = True
        if request in self.requests:
            self.requests.remove(request)
        request.ticket._fail(error)


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


__all__ = ["Counters", "SchedulerStats", "WindowQueue"]
