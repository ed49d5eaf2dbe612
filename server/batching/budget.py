"""What sizes each batch: the :class:`BatchBudget` the scheduler is handed (the engine gives it
the memory gate's, :class:`server.memory.batch_budget.BatchBudget`), and
:class:`CallableBudget` for a fixed size or two plain callables (tests, benches)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from server.batching.options import BatchKey


class BatchBudget(Protocol):
    """What the scheduler asks before and around each batch (the engine hands it the memory
    gate's :class:`server.memory.batch_budget.BatchBudget`; tests and benches a fixed size).

    Each ``max_batch`` call that returns is followed by exactly one ``batch`` scope: when no
    window is left to take by then (their requests were cancelled, or the scheduler closed),
    one of size 0 with no batch in it, so that what ``max_batch`` reserved always has a scope
    to end in.
    """

    def max_batch(self, key: BatchKey, ready: int) -> int:
        """How many windows the next batch of ``key`` may hold (values below 1 count as 1);
        ``ready`` windows could join it now. To refuse work, raise: the error is delivered, as
        a :class:`BatchFailedError`, to every request with windows of that key. It may block,
        for instance to wait for memory."""
        ...

    def batch(self, key: BatchKey, size: int) -> AbstractContextManager[object]:
        """Held on the worker thread while a batch of ``size`` windows runs (to reserve its
        memory, trace it or inject faults). An exception raised on entering it fails the
        batch like a model error would."""
        ...


class CallableBudget:
    """A :class:`BatchBudget` from two plain callables: ``max_batch(key) -> int`` and, when
    given, ``around_batch(key, size) -> context manager``."""

    def __init__(
        self,
        max_batch: Callable[[BatchKey], int],
        around_batch: Callable[[BatchKey, int], AbstractContextManager[object]] | None = None,
    ) -> None:
        self._max_batch = max_batch
        self._around_batch = around_batch

    def max_batch(self, key: BatchKey, ready: int) -> int:
        return self._max_batch(key)

    def batch(self, key: BatchKey, size: int) -> AbstractContextManager[object]:
        return self._around_batch(key, size) if self._around_batch else nullcontext()


__all__ = ["BatchBudget", "CallableBudget"]
