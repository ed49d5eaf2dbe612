"""Who goes first: the classes of work, their order, and the bound that keeps the last from
starving. The scheduler asks this module and decides nothing about order itself.

Four classes, in the order the worker serves them:

1. ``live_final``: a live session's final decode of a turn (and the early one made while the
   VAD waits out the silence that ends it): someone is waiting for ``completed``.
2. ``live_interim``: a live session's interim decode, for deltas while the speaker goes on.
3. ``short``: an HTTP request of at most :data:`SHORT_REQUEST_S` seconds of audio.
4. ``long``: the windows of a longer file (or of a stream whose length is unknown).

Within a class, requests take turns (the least recently served first), as they always have. A
request of a later class still progresses: once its next window has waited
:attr:`SchedulingPolicy.starvation_s` seconds, or :attr:`SchedulingPolicy.starvation_batches`
batches have run without it, it leads the next batch whatever else is queued.

A decode may also run outside the queue, in its caller's thread (the scheduler's ``decode``,
for a request that holds a slot of its own; a live decode always does under
``WHISPER_BATCHING=auto``). While one of a class that :meth:`SchedulingPolicy.holds` others
runs there, no decode of a later class starts a step (encode, generate, align): the worker
starts no such batch and holds a running one between its steps, and so does a window decoded
inline in another slot, so that the model's threads are the live decode's. The same
starvation bound applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, Protocol, TypeVar

#: Audio up to this long is a short request (two 30 s windows: what the planner's ``auto``
#: batching decodes alone rather than in batches of its own windows).
SHORT_REQUEST_S = 60.0

#: Upper bounds (seconds) of the queue-wait histogram kept per class.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

LiveDecode = Literal["final", "interim"]


class WorkClass(IntEnum):
    """A class of work; lower values are served first."""

    LIVE_FINAL = 0
    LIVE_INTERIM = 1
    SHORT = 2
    LONG = 3

    @property
    def label(self) -> str:
        """The name shown in ``/v1/memory`` and in the metrics' ``class`` label."""
        return self.name.lower()

    @property
    def live(self) -> bool:
        return self in (WorkClass.LIVE_FINAL, WorkClass.LIVE_INTERIM)


def classify(*, live: LiveDecode | None, seconds: float | None) -> WorkClass:
    """The class of a request: a live session's decode by its kind, anything else by the
    length of its audio (``None``: unknown, which counts as long).

    Args:
        live: ``"final"`` or ``"interim"`` for a live session's decode, None otherwise.
        seconds: Seconds of audio, exact or as the header declares them.
    """
    if live == "final":
        return WorkClass.LIVE_FINAL
    if live == "interim":
        return WorkClass.LIVE_INTERIM
    if seconds is not None and seconds <= SHORT_REQUEST_S:
        return WorkClass.SHORT
    return WorkClass.LONG


class Waiting(Protocol):
    """What the policy reads of a queued request."""

    @property
    def work_class(self) -> WorkClass: ...

    @property
    def waiting_since(self) -> float: ...  # monotonic time its next window began to wait

    @property
    def skipped(self) -> int: ...  # batches run without it while it had a window ready


R = TypeVar("R", bound=Waiting)


@dataclass(frozen=True)
class SchedulingPolicy:
    """The order of the classes and the starvation bound (see the module doc).

    Attributes:
        starvation_s: A request whose next window has waited this long leads the next batch.
        starvation_batches: So does one that this many batches have passed by.
    """

    starvation_s: float = 5.0
    starvation_batches: int = 8

    def __post_init__(self) -> None:
        if self.starvation_s <= 0 or self.starvation_batches < 1:
            raise ValueError("the starvation bound must be positive")

    def overdue(self, request: Waiting, now: float) -> bool:
        """Whether ``request`` has waited past the bound and goes first."""
        return (
            now - request.waiting_since >= self.starvation_s
            or request.skipped >= self.starvation_batches
        )

    def order(self, requests: Sequence[R], now: float) -> list[list[R]]:
        """``requests`` (in round-robin order, the least recently served first) grouped in
        the order they are served: the overdue ones first, the longest waiting at the head,
        then each class in turn, each group keeping the round-robin order."""
        overdue = sorted(
            (r for r in requests if self.overdue(r, now)), key=lambda r: r.waiting_since
        )
        groups: list[list[R]] = [overdue] if overdue else []
        rest = [r for r in requests if not any(r is o for o in overdue)]
        for work_class in WorkClass:
            group = [r for r in rest if r.work_class == work_class]
            if group:
                groups.append(group)
        return groups

    def lead(self, requests: Sequence[R], now: float) -> R | None:
        """The request whose window leads the next batch (None when there is none)."""
        groups = self.order(requests, now)
        return groups[0][0] if groups else None

    def joins(self, lead: WorkClass, other: WorkClass) -> bool:
        """Whether a window of class ``other`` may fill a batch led by class ``lead``. A live
        batch takes live windows only: on the CPU a batch costs about the sum of its windows,
        so a file's window beside a live one would make the live decode wait for it."""
        return other.live or not lead.live

    def holds(self, running: WorkClass, queued: WorkClass) -> bool:
        """Whether a decode of class ``running`` in its caller's thread holds back the
        worker's batches of class ``queued``. Final live decodes do, of every later class;
        interim ones hold nothing (they take at most half of a session's time anyway)."""
        return running == WorkClass.LIVE_FINAL and queued > running

    def until_overdue(self, request: Waiting, now: float) -> float:
        """Seconds until ``request`` is overdue by time (0 when it is already)."""
        return max(0.0, request.waiting_since + self.starvation_s - now)


@dataclass(frozen=True)
class ClassStats:
    """One class's queue, for ``/v1/memory`` and the metrics.

    Attributes:
        queued_windows: Its windows waiting for a batch now.
        inline: Its decodes running now in their callers' threads (outside the queue).
        waited: Its windows taken from the queue so far.
        wait_seconds: How long they waited, summed.
        max_wait_seconds: The longest wait.
        buckets: How many waited at most each of :data:`WAIT_BUCKETS` (cumulative).
    """

    queued_windows: int
    inline: int
    waited: int
    wait_seconds: float
    max_wait_seconds: float
    buckets: tuple[int, ...]

    @property
    def mean_wait_seconds(self) -> float:
        return self.wait_seconds / self.waited if self.waited else 0.0


class Waits:
    """How long each class's windows waited in the queue (not thread-safe: the scheduler
    calls it under its lock)."""

    def __init__(self) -> None:
        self._count = dict.fromkeys(WorkClass, 0)
        self._sum = dict.fromkeys(WorkClass, 0.0)
        self._max = dict.fromkeys(WorkClass, 0.0)
        self._buckets = {c: [0] * len(WAIT_BUCKETS) for c in WorkClass}

    def record(self, work_class: WorkClass, seconds: float) -> None:
        self._count[work_class] += 1
        self._sum[work_class] += seconds
        self._max[work_class] = max(self._max[work_class], seconds)
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self._buckets[work_class][i] += 1

    def stats(self, work_class: WorkClass, queued: int, inline: int) -> ClassStats:
        return ClassStats(
            queued_windows=queued,
            inline=inline,
            waited=self._count[work_class],
            wait_seconds=self._sum[work_class],
            max_wait_seconds=self._max[work_class],
            buckets=tuple(self._buckets[work_class]),
        )


__all__ = [
    "SHORT_REQUEST_S",
    "WAIT_BUCKETS",
    "ClassStats",
    "LiveDecode",
    "SchedulingPolicy",
    "Waiting",
    "Waits",
    "WorkClass",
    "classify",
]
