"""The memory gate: the one door every piece of work passes before it takes memory.

A piece of a file, a realtime session's buffers, an upload held in memory, a scheduler's batch
and a model load all go through :class:`MemoryGate`: a fresh reading of the device (the probe),
the limits that apply there (the policy), the planner's decision, and the reservation that
decision needs, as one step under the ledger's lock, so that two callers never spend the same
free memory. When the planner says memory may free up, the gate waits (bounded); before it lets
the planner degrade or refuse work, it unloads an idle model (the ladder's first rung).

The gate owns the host's accounting too: what the process holds outside any reservation (its
resident memory with nothing running, read by :meth:`MemoryGate.settle`) counts against
``WHISPER_HOST_MEMORY_LIMIT``.

What it does not know: which models exist and which are idle. It asks its :class:`Residents`
(the engine's model residency) for that, an object handed to it, so memory never calls the
engine back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import psutil

from server.config import Settings
from server.errors import InsufficientMemoryError
from server.memory.cost import CostModel
from server.memory.host_heap import release_freed_memory
from server.memory.planner import (
    Budget,
    Degradation,
    Plan,
    PlanRequest,
    Policy,
    Step,
    memory_budget,
    plan_request,
)
from server.memory.probes import MemoryProbe, MemorySnapshot, device_kind, open_probe
from server.memory.reservations import Reservation, Reservations
from server.memory.sizes import format_bytes

logger = logging.getLogger(__name__)

#: The ledger's key for what requests hold in host RAM (their audio, features, uploads).
HOST = "host"


def batched_key(place: str) -> str:
    """The ledger's key for the working memory of requests waiting in ``place``'s scheduler."""
    return f"{place}/batched"


@dataclass(frozen=True)
class LoadNeeds:
    """What loading one model takes (see :meth:`MemoryGate.room_for_load`).

    Attributes:
        device_bytes: On its device once loaded: the weights and one window's working memory
            (or it would load only to refuse every request). On the CPU, host RAM.
        weights_bytes: The weights, which stay resident.
        host_peak_bytes: Host RAM while it loads, above what the process held before: the
            file's tensors and their converted copies at once (:meth:`CostModel.load_host_bytes`),
            on a GPU too (the file passes through the host).
    """

    device_bytes: int
    weights_bytes: int
    host_peak_bytes: int


class Resident(Protocol):
    """A loaded model, as the gate sees it."""

    @property
    def device(self) -> str: ...

    @property
    def weights_bytes(self) -> int: ...

    @property
    def label(self) -> str: ...


class Residents(Protocol):
    """The models this process holds: what the gate asks before it evicts one."""

    def resident_bytes(self, place: str) -> int:
        """Weights resident on ``place``."""
        ...

    def idle(self, place: str, exclude: object = None) -> Sequence[Resident]:
        """Models on ``place`` that nothing holds and nothing pins, least recently used first."""
        ...

    def unload(self, model: Resident, reason: str) -> bool:
        """Unload ``model`` now if it is still idle; whether it was."""
        ...


@dataclass
class GateStats:
    """The gate's counters, for /v1/memory and /metrics."""

    waits: int = 0
    """Plans that waited for memory to free up (each wait counted)."""
    rejected: int = 0
    """Work refused for lack of memory (503)."""
    waiting_for_memory: int = 0
    """Plans (a request's piece, or a scheduler's batch) waiting for memory now."""


class MemoryGate:
    """Probe + policy + plan + reserve under the ledger's lock; a bounded wait; eviction first.

    Args:
        settings: The limits (``WHISPER_*_MEMORY_LIMIT``, headrooms, the ladder, the wait).
        reservations: The ledger every path reserves in.
    """

    def __init__(self, settings: Settings, reservations: Reservations) -> None:
        self.settings = settings
        self.reservations = reservations
        self.stats = GateStats()
        #: The models held (resident bytes, idle ones to evict); set by the engine.
        self.residents: Residents | None = None
        #: Whether the server runs on CUDA (the CPU fallback is a rung only then).
        self.cuda = False
        #: Whether loads are planned: not at start-up (the served model), and not with
        #: WHISPER_MEMORY_POLICY=off.
        self.plans_loads = False
        #: Reads what this process holds on the host outside any reservation; by default its
        #: resident memory. Counted against WHISPER_HOST_MEMORY_LIMIT (see :meth:`settle`).
        self.footprint: Callable[[], int] = _process_rss
        #: The last reading of :attr:`footprint` taken with nothing running.
        self.idle_host_bytes = 0
        self._probes: dict[str, MemoryProbe] = {}
        self._counting = threading.Lock()

    # ---- readings and limits --------------------------------------------------------------

    def probe(self, place: str) -> MemoryProbe:
        """The probe that reads ``place`` (NVML for a GPU, host RAM for ``cpu``)."""
        if place not in self._probes:
            self._probes[place] = open_probe(place, self.settings.device_index[0])
        return self._probes[place]

    def policy(self, place: str) -> Policy:
        """The planner's limits for work on ``place``. What this process holds outside any
        reservation counts against the limits: on a GPU the weights of the models loaded there,
        and on the host the process's idle resident memory (the runtime, libraries and CPU
        models), as last seen with nothing running."""
        s = self.settings
        on_gpu = device_kind(place) == "cuda"
        return Policy(
            mode=s.memory_policy,
            ladder=s.degrade_ladder,
            device_limit=s.gpu_memory_limit,
            device_headroom=s.gpu_headroom,
            host_limit=s.host_memory_limit,
            host_headroom=s.host_headroom,
            max_wait=s.max_memory_wait,
            cpu_fallback=s.cpu_fallback and self.cuda,
            retry_after=s.retry_after,
            resident_bytes=self._resident(place) if on_gpu else 0,
            host_resident_bytes=self.idle_host_bytes,
        )

    def reserved_bytes(self, place: str) -> int:
        """Memory reserved on ``place`` now: by sequential requests, by requests waiting in the
        scheduler, and by the batch running beyond what those requests hold."""
        return self.reservations.total(place) + self.reservations.total(batched_key(place))

    def free_budget(self, place: str, snapshot: MemorySnapshot | None = None) -> Budget:
        """What new work (a model load, a request) may use on ``place`` now:
        ``min(free - reserved - headroom, limit - resident - reserved)``, the planner's own
        figure (call under the ledger's lock). ``snapshot``: a reading taken already."""
        snapshot = snapshot or self.probe(place).snapshot()
        if device_kind(place) == "cuda":
            policy = self.policy(place)
            return memory_budget(
                snapshot.device,
                headroom=policy.device_headroom,
                limit=policy.device_limit,
                resident=policy.resident_bytes,
                reserved=self.reserved_bytes(place),
            )
        return self.host_budget(snapshot)

    def host_budget(self, snapshot: MemorySnapshot) -> Budget:
        """Host RAM new work may use, from any device's reading (each reads the host too)."""
        policy = self.policy("cpu")
        return memory_budget(
            snapshot.host,
            headroom=policy.host_headroom,
            limit=policy.host_limit,
            resident=policy.host_resident_bytes,
            reserved=self.reservations.total(HOST) + self.reserved_bytes("cpu"),
        )

    # ---- what is held outside plans -------------------------------------------------------

    def hold(self, nbytes: int, owner: str, api_key: str | None = None) -> Reservation:
        """Count ``nbytes`` already in host memory (an upload, a form) until released. It is
        there already, so it is counted, never refused: what it takes is what later plans no
        longer see as free. ``api_key``: the id of the key ``owner`` came with."""
        return self.reservations.reserve(HOST, nbytes, owner, api_key)

    def release_leftovers(self, owner: str) -> None:
        """Once a request has ended (its worker stopped), release whatever it still holds in
        the ledger, and say so: every path should have released its own, so anything found
        here is a bug, but not one that shrinks the budget for every later request."""
        for reservation in self.reservations.release_owner(owner):
            logger.error("request %s ended holding %r; released it", owner, reservation)

    def settle(self) -> None:
        """With nothing running, read the process's resident memory: what it holds outside
        any reservation, counted against WHISPER_HOST_MEMORY_LIMIT. Called at start-up and
        when work ends; a reading taken while anything is reserved is skipped."""
        with self.reservations.planning():
            if not self.reservations.snapshot():
                self.idle_host_bytes = self.footprint()

    def forget_host_bytes(self, nbytes: int) -> None:
        """The process holds ``nbytes`` less outside reservations (a CPU model unloaded);
        :meth:`settle` reads the exact figure when nothing is reserved, which may not be now."""
        with self.reservations.planning():
            self.idle_host_bytes = max(0, self.idle_host_bytes - nbytes)

    # ---- planning -------------------------------------------------------------------------

    def plan_now(
        self,
        place: str,
        cost: CostModel,
        request: PlanRequest,
        steps: tuple[Step, ...],
        *,
        reserved_keys: tuple[str, ...],
        cpu_load_bytes: int | None,
        waited: float = 0.0,
    ) -> Plan:
        """The planner's decision against a fresh reading of ``place``, counting what is
        reserved under ``reserved_keys`` (call under the ledger's lock); nothing is reserved."""
        return plan_request(
            request,
            self.probe(place).snapshot(),
            replace(self.policy(place), ladder=steps),
            reserved=sum(self.reservations.total(k) for k in reserved_keys),
            host_reserved=self.reservations.total(HOST),
            cost=cost,
            waited=waited,
            cpu_load_bytes=cpu_load_bytes,
        )

    def plan(
        self,
        place: str,
        cost: CostModel,
        request: PlanRequest,
        steps: tuple[Step, ...],
        *,
        reserved_keys: tuple[str, ...],
        cpu_load_bytes: int | None,
        on_run: Callable[[Plan], None] | None = None,
        keep: object = None,
    ) -> tuple[Plan, float]:
        """Plan against a fresh reading until the planner runs or rejects, waiting (bounded by
        the policy) while it says memory may free up. Reading, planning and ``on_run`` (the
        caller's reservations) happen under the ledger's lock, as one step. Before the plan
        would degrade, wait or reject, an idle model on ``place`` (other than ``keep``, the
        one the work runs on) is unloaded and the work planned again, and that is reported as
        the ``evict`` degradation.

        Returns:
            The final plan (``run`` or ``reject``) and the seconds spent waiting.
        """
        waited = 0.0
        evicted: list[Degradation] = []
        counted = False
        with ExitStack() as waiting:
            while True:
                since = self.reservations.generation
                evict: Resident | None = None
                with self.reservations.planning():
                    plan = self.plan_now(
                        place,
                        cost,
                        request,
                        steps,
                        reserved_keys=reserved_keys,
                        cpu_load_bytes=cpu_load_bytes,
                        waited=waited,
                    )
                    if plan.action != "run" or plan.degradations:
                        evict = self._evictable(place, keep)
                    if evict is None and plan.action == "run" and on_run is not None:
                        on_run(plan)
                if evict is not None:
                    why = plan.why
                    assert self.residents is not None
                    if self.residents.unload(evict, f"to make room for a request: {why}"):
                        evicted.append(
                            Degradation(
                                "evict",
                                f"unloaded idle model {evict.label} from {evict.device} "
                                f"({format_bytes(evict.weights_bytes)}) to make room: {why}",
                            )
                        )
                    continue
                if plan.action != "wait":
                    if evicted:
                        plan = replace(plan, degradations=(*evicted, *plan.degradations))
                    if plan.action == "reject":
                        self.stats.rejected += 1
                    return plan, waited
                self.stats.waits += 1
                if not counted:  # once, from the first wait until it runs or is rejected
                    waiting.enter_context(self.counted_waiting())
                    counted = True
                started = time.monotonic()
                self.reservations.wait_for_release(timeout=min(plan.wait_s, 0.5), since=since)
                waited += time.monotonic() - started

    def could_evict(self, place: str, keep: object = None) -> bool:
        """Whether an idle model on ``place`` could be unloaded to make room."""
        return self._evictable(place, keep) is not None

    @contextmanager
    def counted_waiting(self) -> Iterator[None]:
        """Count a plan among those waiting for memory while the block runs."""
        with self._counting:
            self.stats.waiting_for_memory += 1
        try:
            yield
        finally:
            with self._counting:
                self.stats.waiting_for_memory -= 1

    # ---- model loads ----------------------------------------------------------------------

    @contextmanager
    def room_for_load(self, place: str, model_id: str, needs: LoadNeeds) -> Iterator[None]:
        """Plan a model load as a request is planned, with what the load really takes: room on
        ``place`` for its weights and one window's work, and host RAM for its peak while it
        loads (the file's tensors and their converted copies at once: on the CPU that is more
        than twice the weights). Where either does not fit, idle models there are unloaded
        first (least recently used first), before the load, not after it; then it waits
        (bounded by WHISPER_MAX_MEMORY_WAIT), then it is refused. The peak and the weights stay
        reserved while it loads, so concurrent plans do not spend the same memory. Loads at
        start-up (the served model) and under WHISPER_MEMORY_POLICY=off are not planned.

        Raises:
            InsufficientMemoryError: no room, after unloading and waiting.
        """
        if not self.plans_loads or self.settings.memory_policy == "off":
            yield
            return
        on_gpu = device_kind(place) == "cuda"
        # On the CPU the device is host RAM: the load's peak and its lasting need share it.
        host_need = (
            needs.host_peak_bytes if on_gpu else max(needs.host_peak_bytes, needs.device_bytes)
        )
        waited = 0.0
        while True:
            since = self.reservations.generation
            held = ExitStack()
            with self.reservations.planning():
                short = self._load_shortfall(place, needs.device_bytes, host_need)
                if short is None:
                    owner = f"load:{model_id}"
                    if on_gpu:
                        held.enter_context(
                            self.reservations.reserve(place, needs.weights_bytes, owner)
                        )
                    held.enter_context(self.reservations.reserve(HOST, host_need, owner))
            if short is None:
                break
            where, need, budget = short
            idle = self._evictable(where, None)
            if idle is not None:
                assert self.residents is not None
                self.residents.unload(
                    idle,
                    f"to make room for loading {model_id} ({format_bytes(need)} needed on "
                    f"{where}, {budget.why})",
                )
                continue
            if waited >= self.settings.max_memory_wait:
                what = "of host RAM while it loads" if where == "cpu" else f"on {where}"
                raise InsufficientMemoryError(
                    f"Not enough memory to load model {model_id!r} on {place}: it needs about "
                    f"{format_bytes(need)} {what} and {budget.why}; retry after the delay in "
                    "Retry-After.",
                    retry_after=self.settings.retry_after,
                )
            started = time.monotonic()
            self.reservations.wait_for_release(timeout=0.5, since=since)
            waited += time.monotonic() - started
        with held:
            yield
        if place == "cpu":
            # The weights are now part of what the process holds outside reservations; count
            # them at once, as settle() would if nothing else were running.
            with self.reservations.planning():
                self.idle_host_bytes += needs.weights_bytes
        release_freed_memory()  # loading parses files and converts weights; keep none of that

    def _load_shortfall(
        self, place: str, device_need: int, host_need: int
    ) -> tuple[str, int, Budget] | None:
        """Where a load does not fit now (the place, what it needs there and the budget
        there), or None when it fits everywhere (call under the ledger's lock)."""
        snapshot = self.probe(place).snapshot()
        if device_kind(place) == "cuda":
            budget = self.free_budget(place, snapshot)
            if device_need > budget.amount:
                return place, device_need, budget
        host = self.host_budget(snapshot)
        if host_need > host.amount:
            return "cpu", host_need, host
        return None

    # ---- helpers --------------------------------------------------------------------------

    def _resident(self, place: str) -> int:
        return self.residents.resident_bytes(place) if self.residents is not None else 0

    def _evictable(self, place: str, keep: object) -> Resident | None:
        if self.residents is None or self.settings.memory_policy == "off":
            return None
        idle = self.residents.idle(place, exclude=keep)
        return idle[0] if idle else None


def _process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


__all__ = ["HOST", "GateStats", "LoadNeeds", "MemoryGate", "Resident", "Residents", "batched_key"]
