"""What one model's scheduler may batch: the memory gate, as a scheduler asks it.

A scheduler's worker asks :meth:`BatchBudget.max_batch` before each batch how many windows it
may take, and holds :meth:`BatchBudget.batch` around the batch it then runs, on the same
thread; a scheduler with several workers runs several batches at once, each planned and
reserved on its own. The budget plans through the
:class:`~server.memory.gate.MemoryGate` like any other work, and reserves only what the batch
needs beyond the working memory its requests reserved when they were planned (each request
headed for the scheduler holds one window's worth under the batched key): requests waiting in
the scheduler never each hold a whole batch's worth, and batches running at once share that
credit rather than each counting all of it. The scheduler is handed this object and
never calls the engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Protocol

from server.errors import InsufficientMemoryError
from server.memory.cost import CostModel, Shape
from server.memory.gate import MemoryGate, batched_key
from server.memory.planner import Plan, PlanRequest, Step
from server.memory.probes import device_kind
from server.memory.reservations import Reservation

logger = logging.getLogger(__name__)

#: The rungs a batch may take: the other degradations were decided when each request was
#: planned.
_BATCH_STEPS = (Step.BATCH, Step.WAIT, Step.REJECT)


class BatchShaped(Protocol):
    """A batch key, as far as memory goes: what a batch of its windows is shaped like."""

    def memory_shape(self, device: str, compute_type: str, batch_size: int) -> Shape: ...


class CostedModel(Protocol):
    """The model a scheduler decodes with, as far as memory goes."""

    device: str
    compute_type: str
    cost: CostModel


class BatchBudget:
    """The memory a model's batches may take (see the module doc).

    Args:
        gate: The memory gate.
        model: The model the batches run on; an out-of-memory error in a batch raises its cost
            model's estimate for the batch's shape.
        largest: The largest batch (WHISPER_BATCH_SIZE, or the device's default).
        ladder: The degradation ladder (only its batch, wait and reject rungs apply).
        retry_after: Seconds a refused batch's requests are told to wait.
    """

    def __init__(
        self,
        gate: MemoryGate,
        model: CostedModel,
        *,
        largest: int,
        ladder: tuple[Step, ...],
        retry_after: float,
    ) -> None:
        self.gate = gate
        self.model = model
        self.largest = largest
        self.steps = tuple(s for s in ladder if s in _BATCH_STEPS) or (Step.REJECT,)
        self.retry_after = retry_after
        self._lock = threading.Lock()
        # Per worker thread: what max_batch reserved, until that worker's batch scope takes it.
        self._planned: dict[int, Reservation] = {}
        # Per worker thread: the requests' queued memory its batch counts as its own.
        self._credited: dict[int, int] = {}

    def max_batch(self, key: BatchShaped, ready: int) -> int:
        """The planner's batch size for the next batch of ``key``'s windows, reserving for it.

        The batch is planned against the memory left once everything else is counted (the
        requests' own reservations under the batched key are what it spends), and reserves
        until it ends only what it needs beyond them, for the ``ready`` windows that could join
        it now rather than for the largest batch: a piece of a sparse recording may hold one
        window of speech, and other work must not be refused for the seven that never come.
        :meth:`batch` resizes that reservation to the windows taken and releases it.

        Raises:
            InsufficientMemoryError: even one window does not fit, after the bounded wait.
        """
        model = self.model
        place = model.device
        me = threading.get_ident()

        def reserve(plan: Plan) -> None:
            size = max(1, min(plan.shape.batch_size, ready))
            reservation = self.gate.reservations.reserve(
                place, self._beyond_queued(key, size), "batch"
            )
            with self._lock:
                stale = self._planned.pop(me, None)
                self._planned[me] = reservation
            if stale is not None:  # never, as long as the scheduler pairs the two calls
                logger.error("a batch's reservation was never closed: %r; released it", stale)
                stale.release()

        try:
            plan, _ = self.gate.plan(
                place,
                model.cost,
                # The requests hold their pieces' host memory: the batch plans its working memory.
                PlanRequest(
                    shape=self._shape(key, self.largest), audio_seconds=30.0, host_held=True
                ),
                self.steps,
                reserved_keys=(place,),
                cpu_load_bytes=0,
                on_run=reserve,
                keep=model,
            )
        except BaseException:
            self._end(me)
            raise
        if plan.action == "reject":
            self._end(me)
            raise InsufficientMemoryError(
                f"Not enough memory for a batch ({plan.reason}); retry later.",
                retry_after=plan.retry_after or self.retry_after,
            )
        return plan.shape.batch_size

    @contextmanager
    def batch(self, key: BatchShaped, size: int) -> Iterator[None]:
        """Held around every batch :meth:`max_batch` planned: sizes the batch's reservation to
        the ``size`` windows taken (at most the planner's batch), releases it when the batch
        ends, and an out-of-memory error raises the batch shape's estimate. A batch that found
        no window left to take (``size`` 0: its requests were cancelled meanwhile, or the
        scheduler closed) only gives back what was reserved for it."""
        me = threading.get_ident()
        with self._lock:
            planned = self._planned.pop(me, None)
        with ExitStack() as held:
            held.callback(self._end, me)
            if planned is not None:
                held.enter_context(planned)
            if size == 0:
                yield
                return
            held.enter_context(
                self.gate.reservations.reserve(
                    self.model.device, self._beyond_queued(key, size), "batch"
                )
            )
            if planned is not None:
                planned.release()  # resized to the batch taken (the new one is held first)
            try:
                yield
            except Exception as exc:
                from server.memory.oom import is_out_of_memory

                if is_out_of_memory(exc):
                    model = self.model
                    model.cost = model.cost.with_correction(self._shape(key, size), 1.5)
                raise

    def _shape(self, key: BatchShaped, size: int) -> Shape:
        model = self.model
        return key.memory_shape(device_kind(model.device), model.compute_type, size)

    def _beyond_queued(self, key: BatchShaped, size: int) -> int:
        """What a batch of ``size`` windows (this thread's) needs beyond the working memory its
        requests hold: of that memory, only what other batches running now do not count."""
        needs = self.model.cost.estimate(self._shape(key, size)).device_bytes
        queued = self.gate.reservations.total(batched_key(self.model.device))
        me = threading.get_ident()
        with self._lock:
            others = sum(n for thread, n in self._credited.items() if thread != me)
            credit = min(needs, max(0, queued - others))
            self._credited[me] = credit
        return needs - credit

    def _end(self, me: int) -> None:
        """This thread's batch is over (or was never planned): its credit goes back."""
        with self._lock:
            self._credited.pop(me, None)
            stale = self._planned.pop(me, None)
        if stale is not None:
            stale.release()


__all__ = ["BatchBudget", "BatchShaped", "CostedModel"]
