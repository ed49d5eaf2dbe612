"""The planner: given what a request asks for and what memory is free, decide how to run it.

:func:`plan_request` is a pure function -- no I/O, no clock, no logging -- so every decision is a
table-driven unit test. The caller reads a :class:`~server.memory.probes.MemorySnapshot`,
plans, reserves ``plan.reserve_bytes`` while the request runs, and logs
``plan.degradations``.

Budget on the device::

    budget = min(free - reserved - headroom,          # what NVML says is free now
                 limit - resident - reserved)          # if a device limit is set

``reserved`` is memory that requests of ours already running have been promised. Part of it
may already be allocated -- and so already missing from NVML's ``free`` -- which means it is
subtracted twice. That is deliberate: the planner cannot tell how much of a reservation has
been allocated (a request's usage climbs to its peak and drops between phases), and
under-counting is what causes out-of-memory errors. The cost is at most one running request's
allocated share of capacity left idle until it finishes. The same holds for CTranslate2's
allocator cache, which NVML reports as used even though our next request could reuse it.
Never is anything planned beyond ``free - headroom``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal

from server.memory.cost import CostEstimate, CostModel, Shape
from server.memory.probes import DeviceMemory, MemorySnapshot
from server.memory.sizes import MemoryAmount, format_bytes


class Step(str, Enum):
    """One rung of the ladder the planner walks down when a request does not fit."""

    BATCH = "batch"
    """Halve the batch of windows decoded together, down to the request's minimum."""
    CHUNK = "chunk"
    """Shorter windows: 30 -> 20 -> 15 -> 10 s, not below ``Policy.min_chunk_length``."""
    GREEDY = "greedy"
    """One hypothesis per window instead of a beam (or ``best_of`` samples)."""
    WORD_TIMESTAMPS = "word_timestamps"
    """Skip the alignment pass: segments keep their timestamps, words get none."""
    WAIT = "wait"
    """Wait (up to ``Policy.max_wait``) for memory to be freed."""
    CPU = "cpu"
    """Run on the CPU instead (if ``Policy.cpu_fallback``)."""
    REJECT = "reject"
    """Refuse, with a Retry-After."""

    def __str__(self) -> str:
        return self.value


DEFAULT_LADDER: tuple[Step, ...] = tuple(Step)
#: Window lengths the ``chunk`` step goes through, longest first.
CHUNK_LENGTHS: tuple[int, ...] = (30, 20, 15, 10)
#: The steps that change the shape (the others wait, move or refuse).
SHRINK_STEPS: tuple[Step, ...] = (Step.BATCH, Step.CHUNK, Step.GREEDY, Step.WORD_TIMESTAMPS)
MIN_CHUNK_LENGTH = 10


def parse_ladder(steps: Iterable[str | Step]) -> tuple[Step, ...]:
    """A ladder from its steps' names (``WHISPER_DEGRADE_LADDER``), in the order given.

    Raises:
        ValueError: An unknown step, or one named twice; the message lists the valid names.
    """
    ladder: list[Step] = []
    for name in steps:
        try:
            step = Step(name)
        except ValueError:
            raise ValueError(
                f"unknown step {name!r}; choose from {', '.join(s.value for s in Step)}"
            ) from None
        if step in ladder:
            raise ValueError(f"a step appears twice in the ladder {[str(s) for s in steps]}")
        ladder.append(step)
    return tuple(ladder)


def rungs(
    step: Step, shape: Shape, *, min_batch: int = 1, min_chunk_length: int = MIN_CHUNK_LENGTH
) -> list[Shape]:
    """The shapes one shrinking step goes through from ``shape``, each smaller than the last.

    This is the ladder's one definition of a rung: the planner tries them in order until one
    fits, and :func:`step_down` takes the first after an out-of-memory error.

    Args:
        step: A shrinking step (the others have no rungs).
        shape: Where it starts.
        min_batch: The ``batch`` step stops here.
        min_chunk_length: The ``chunk`` step stops here (a length in :data:`CHUNK_LENGTHS`).

    Returns:
        The candidate shapes, largest first; empty when the step can go no further.
    """
    if step is Step.BATCH:
        floor, batch, out = max(1, min_batch), shape.batch_size, []
        while batch > floor:
            batch = max(floor, batch // 2)
            out.append(replace(shape, batch_size=batch))
        return out
    if step is Step.CHUNK:
        return [
            replace(shape, chunk_length=length)
            for length in CHUNK_LENGTHS
            if min_chunk_length <= length < shape.chunk_length
        ]
    if step is Step.GREEDY and shape.beam_size > 1:
        return [replace(shape, beam_size=1)]
    if step is Step.WORD_TIMESTAMPS and shape.word_timestamps:
        return [replace(shape, word_timestamps=False)]
    return []


def step_down(
    shape: Shape, ladder: Iterable[str | Step], *, min_chunk_length: int = MIN_CHUNK_LENGTH
) -> Shape:
    """The shape one rung down the ladder, after an out-of-memory error.

    The first shrinking step (in ladder order) that can still go further takes one rung: the
    batch halves, the window gets the next shorter length, the beam goes greedy, or word
    timestamps go. The planner's own search uses the same :func:`rungs`.

    Args:
        shape: The shape that ran out of memory.
        ladder: The steps, in order (names or :class:`Step`).
        min_chunk_length: The shortest window the ``chunk`` step may reach.

    Returns:
        The next shape; ``shape`` itself when every step is exhausted.
    """
    for step in parse_ladder(ladder):
        candidates = rungs(step, shape, min_chunk_length=min_chunk_length)
        if candidates:
            return candidates[0]
    return shape


_HOST_PIECE_SECONDS = 30
_DEVICE_HEADROOM = MemoryAmount(512, "MiB")
_HOST_HEADROOM = MemoryAmount(1, "GiB")


@dataclass(frozen=True)
class Policy:
    """How far the planner may go to make a request fit. Defaults live here only.

    Attributes:
        mode: ``adapt`` walks the ladder; ``strict`` runs as asked or waits/rejects; ``off``
            runs as asked without looking at memory.
        ladder: The steps, in the order they are tried.
        device_limit: The most device memory this server may use in total: weights,
            reservations and this request (``22GiB``, ``90%`` of the device).
        device_headroom: Device memory always left free.
        host_limit: The most host RAM this server's requests may use.
        host_headroom: Host RAM always left free.
        max_wait: Seconds a request may wait for memory before the next step.
        cpu_fallback: Whether the ``cpu`` step may run requests on the CPU.
        min_chunk_length: Shortest window the ``chunk`` step may choose, in seconds.
        retry_after: Seconds suggested to a rejected client.
        resident_bytes: Weights of the models loaded on the device, counted against
            ``device_limit`` (against ``host_limit`` when serving on the CPU).
        host_resident_bytes: Memory this server holds on the host besides reservations (a CPU
            copy of the model, for instance), counted against ``host_limit``.
        poll_interval: Longest single wait, so memory freed by other processes is noticed.
        cpu_compute_type: Compute type of the CPU fallback.
    """

    mode: Literal["adapt", "strict", "off"] = "adapt"
    ladder: tuple[Step, ...] = DEFAULT_LADDER
    device_limit: MemoryAmount | None = None
    device_headroom: MemoryAmount = _DEVICE_HEADROOM
    host_limit: MemoryAmount | None = None
    host_headroom: MemoryAmount = _HOST_HEADROOM
    max_wait: float = 10.0
    cpu_fallback: bool = False
    min_chunk_length: int = MIN_CHUNK_LENGTH
    retry_after: float = 5.0
    resident_bytes: int = 0
    host_resident_bytes: int = 0
    poll_interval: float = 0.5
    cpu_compute_type: str = "int8"

    def __post_init__(self) -> None:
        # Accept plain strings and store the enum.
        object.__setattr__(self, "ladder", parse_ladder(self.ladder))
        if self.mode not in ("adapt", "strict", "off"):
            raise ValueError(f"mode must be adapt, strict or off, not {self.mode!r}")
        if self.max_wait < 0 or self.poll_interval <= 0 or self.retry_after < 0:
            raise ValueError("max_wait and retry_after must be >= 0 and poll_interval > 0")
        if not 1 <= self.min_chunk_length <= 30:
            raise ValueError(f"min_chunk_length must be 1..30, not {self.min_chunk_length}")


@dataclass(frozen=True)
class PlanRequest:
    """What the client asked for.

    Attributes:
        shape: The shape as asked, on the preferred device.
        audio_seconds: Length of the audio.
        min_batch_size: The ``batch`` step stops here.
        host_held: The host memory of the audio is reserved already (a batch of windows whose
            requests hold their pieces): only the working memory is planned.
    """

    shape: Shape
    audio_seconds: float
    min_batch_size: int = 1
    host_held: bool = False


@dataclass(frozen=True)
class Degradation:
    """One change from what was asked, with the numbers that forced it.

    Attributes:
        kind: The step (``batch``, ``chunk``, ``greedy``, ``word_timestamps``, ``cpu``).
        reason: For people: ``batch 8 -> 2: needs 3.1 GiB, 1.2 GiB free after 512 MiB
            headroom``.
    """

    kind: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """The planner's decision.

    Attributes:
        action: ``run``, ``wait`` (poll again after ``wait_s``) or ``reject``.
        device: Where it runs (or would have): ``cuda`` or ``cpu``.
        shape: The final shape.
        host_chunk_seconds: Longest piece of audio to hold in host RAM at once: the whole
            audio when it fits, else a multiple of 30 s.
        estimate: The estimate for ``shape``.
        budget: Bytes available for ``estimate.device_bytes`` on ``device``; for a run plan
            the estimate never exceeds it (``off`` mode aside).
        wait_s: How long to wait before planning again (``wait`` only).
        retry_after: Seconds to suggest to the client (``reject`` only).
        degradations: Every change from what was asked, in order.
        reason: Why it waits or is rejected; empty for a run.
        host_bytes: Host RAM the plan uses for audio and features (plus, on the CPU, the
            model if it has to be loaded); reserve it under the host's key.
    """

    action: Literal["run", "wait", "reject"]
    device: str
    shape: Shape
    host_chunk_seconds: float
    estimate: CostEstimate
    budget: int
    wait_s: float = 0.0
    retry_after: float | None = None
    degradations: tuple[Degradation, ...] = ()
    reason: str = ""
    host_bytes: int = 0

    @property
    def reserve_bytes(self) -> int:
        """Device memory to reserve while the plan runs: its estimate."""
        return self.estimate.device_bytes

    @property
    def why(self) -> str:
        """What the planner said of this plan: its reason, or its degradations' ("" if
        neither)."""
        return self.reason or "; ".join(d.reason for d in self.degradations)


@dataclass(frozen=True)
class Budget:
    """Bytes available on one memory, and the sentence that explains the number.

    Attributes:
        amount: Bytes available (never negative).
        why: ``1.2 GiB free after 512 MiB headroom``, or which limit binds.
    """

    amount: int
    why: str


def memory_budget(
    memory: DeviceMemory,
    *,
    headroom: MemoryAmount,
    limit: MemoryAmount | None,
    resident: int,
    reserved: int,
) -> Budget:
    """What one request may use on one memory: ``min(free - reserved - headroom,
    limit - resident - reserved)``.

    Args:
        memory: The reading.
        headroom: Always left free (a percentage is of the total).
        limit: The most this server may use in total, or None.
        resident: This server's memory on it outside reservations (model weights).
        reserved: Promised to requests already running.

    Returns:
        The budget.
    """
    head = headroom.resolve(memory.total)
    free = memory.free - reserved
    amount = free - head
    held = f" and {format_bytes(reserved)} reserved by running requests" if reserved else ""
    if amount >= 0:
        why = f"{format_bytes(amount)} free after {format_bytes(head)} headroom{held}"
    else:
        why = f"{format_bytes(max(free, 0))} free{held}, below the {format_bytes(head)} headroom"
    if limit is not None:
        cap = limit.resolve(memory.total)
        under_limit = cap - resident - reserved
        if under_limit < amount:
            amount = under_limit
            # As the operator wrote it ("90%", "22GiB"), unless that was a bare byte count.
            named = format_bytes(cap) if str(limit).rstrip("B").isdigit() else str(limit)
            why = (
                f"{format_bytes(max(under_limit, 0))} left under the {named} limit "
                f"({format_bytes(resident)} resident, {format_bytes(reserved)} reserved)"
            )
    return Budget(max(0, amount), why)


def choose_host_chunk(
    audio_seconds: float, available: int, host_bytes: Callable[[float], int]
) -> float | None:
    """The longest piece of audio whose host memory fits ``available`` bytes.

    Args:
        audio_seconds: Length of the whole audio.
        available: Host bytes the request may use for audio.
        host_bytes: Host bytes a piece of so many seconds needs (growing with its length).

    Returns:
        ``audio_seconds`` when it all fits, else the largest multiple of 30 s that does (at
        least 30); None when not even that fits.
    """
    if host_bytes(audio_seconds) <= available:
        return audio_seconds
    if host_bytes(_HOST_PIECE_SECONDS) > available:
        return None
    lo, hi = 1, max(1, math.ceil(audio_seconds / _HOST_PIECE_SECONDS))  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if host_bytes(mid * _HOST_PIECE_SECONDS) <= available:
            lo = mid
        else:
            hi = mid
    return float(min(lo * _HOST_PIECE_SECONDS, audio_seconds))


@dataclass(frozen=True)
class _Check:
    """Whether one shape fits, and the numbers behind the answer."""

    shape: Shape
    estimate: CostEstimate
    budget: Budget
    device_ok: bool
    host_chunk: float | None
    host_bytes: int
    needs: int

    @property
    def fits(self) -> bool:
        return self.device_ok and self.host_chunk is not None


class _Planner:
    """The state of one planning call; exists only to keep plan_request readable."""

    def __init__(
        self,
        request: PlanRequest,
        snapshot: MemorySnapshot,
        policy: Policy,
        *,
        reserved: int,
        host_reserved: int,
        cost: CostModel,
        cpu_load_bytes: int | None,
    ) -> None:
        self.request = request
        self.policy = policy
        self.cost = cost
        self.audio = max(0.0, request.audio_seconds)
        if request.shape.device == "cpu":
            # Serving on the CPU: the "device" is host RAM, so one budget covers everything.
            self.device_budget = memory_budget(
                snapshot.host,
                headroom=policy.host_headroom,
                limit=policy.host_limit,
                resident=policy.resident_bytes + policy.host_resident_bytes,
                reserved=reserved + host_reserved,
            )
            self.device_ceiling = self._ceiling(
                snapshot.host,
                policy.host_headroom,
                policy.host_limit,
                policy.resident_bytes + policy.host_resident_bytes,
            )
        else:
            self.device_budget = memory_budget(
                snapshot.device,
                headroom=policy.device_headroom,
                limit=policy.device_limit,
                resident=policy.resident_bytes,
                reserved=reserved,
            )
            self.device_ceiling = self._ceiling(
                snapshot.device, policy.device_headroom, policy.device_limit, policy.resident_bytes
            )
        self.host_budget = memory_budget(
            snapshot.host,
            headroom=policy.host_headroom,
            limit=policy.host_limit,
            resident=policy.host_resident_bytes,
            reserved=host_reserved,
        )
        self.host_ceiling = self._ceiling(
            snapshot.host, policy.host_headroom, policy.host_limit, policy.host_resident_bytes
        )
        self.cpu_load_bytes = (
            cpu_load_bytes
            if cpu_load_bytes is not None
            else cost.load_host_bytes(policy.cpu_compute_type, "cpu")
        )

    @staticmethod
    def _ceiling(
        memory: DeviceMemory, headroom: MemoryAmount, limit: MemoryAmount | None, resident: int
    ) -> int:
        # The most that could ever become available here were every other user to leave; our
        # resident memory (the weights) stays.
        ceiling = memory.total - headroom.resolve(memory.total) - resident
        if limit is not None:
            ceiling = min(ceiling, limit.resolve(memory.total) - resident)
        return ceiling

    def host_of(self, estimate: CostEstimate) -> Callable[[float], int]:
        """Host RAM of a piece of so many seconds, as this request must plan it."""
        return (lambda seconds: 0) if self.request.host_held else estimate.host_bytes

    def check(self, shape: Shape) -> _Check:
        estimate = self.cost.estimate(shape)
        host_of = self.host_of(estimate)
        if shape.device == "cpu":
            load = self.cpu_load_bytes if self.request.shape.device != "cpu" else 0
            budget = self.device_budget if self.request.shape.device == "cpu" else self.host_budget
            room = budget.amount - estimate.device_bytes - load
            chunk = choose_host_chunk(self.audio, room, host_of)
            host = host_of(chunk if chunk is not None else 0) + load
            needs = estimate.device_bytes + host_of(min(self.audio, 30.0)) + load
            return _Check(shape, estimate, budget, needs <= budget.amount, chunk, host, needs)
        chunk = choose_host_chunk(self.audio, self.host_budget.amount, host_of)
        host = host_of(chunk if chunk is not None else 0)
        ok = estimate.device_bytes <= self.device_budget.amount
        return _Check(shape, estimate, self.device_budget, ok, chunk, host, estimate.device_bytes)

    def could_ever_fit(self, check: _Check) -> bool:
        """Whether waiting can help: would it fit were every other user of the memory gone?"""
        if check.shape.device == "cpu" and self.request.shape.device != "cpu":
            return check.needs <= self.host_ceiling
        if check.needs > self.device_ceiling:
            return False
        min_host = self.host_of(check.estimate)(min(self.audio, float(_HOST_PIECE_SECONDS)))
        return min_host <= self.host_ceiling

    # -- plans --

    def run(self, check: _Check, degradations: list[Degradation]) -> Plan:
        return Plan(
            action="run",
            device=check.shape.device,
            shape=check.shape,
            host_chunk_seconds=check.host_chunk if check.host_chunk is not None else self.audio,
            estimate=check.estimate,
            budget=check.budget.amount,
            degradations=tuple(degradations),
            host_bytes=check.host_bytes,
        )

    def stop(
        self,
        action: Literal["wait", "reject"],
        check: _Check,
        degradations: list[Degradation],
        waited: float,
    ) -> Plan:
        remaining = max(0.0, self.policy.max_wait - waited)
        return Plan(
            action=action,
            device=check.shape.device,
            shape=check.shape,
            host_chunk_seconds=check.host_chunk if check.host_chunk is not None else self.audio,
            estimate=check.estimate,
            budget=check.budget.amount,
            wait_s=min(self.policy.poll_interval, remaining) if action == "wait" else 0.0,
            retry_after=self.policy.retry_after if action == "reject" else None,
            degradations=tuple(degradations),
            reason=self.shortfall(check),
            host_bytes=check.host_bytes,
        )

    def shortfall(self, check: _Check) -> str:
        if not check.device_ok:
            where = "host RAM" if check.shape.device == "cpu" else check.shape.device
            return f"{check.shape} needs {format_bytes(check.needs)} on {where}, {check.budget.why}"
        return (
            f"{format_bytes(self.host_of(check.estimate)(min(self.audio, 30.0)))} of host RAM is "
            f"needed for the audio, {self.host_budget.why}"
        )

    # -- the ladder --

    def shrink(self, step: Step, check: _Check) -> tuple[_Check, Degradation | None]:
        """Apply one step as far as it goes (until the shape fits or the step is exhausted)."""
        shape = check.shape
        before = check
        candidates = rungs(
            step,
            shape,
            min_batch=self.request.min_batch_size,
            min_chunk_length=self.policy.min_chunk_length,
        )
        for candidate in candidates:
            check = self.check(candidate)
            if check.device_ok:
                break
        if check.shape == shape:
            return check, None
        return check, Degradation(step.value, self.reason_for(step, before, check.shape))

    def reason_for(self, step: Step, before: _Check, after: Shape) -> str:
        old, new = before.shape, after
        change = {
            Step.BATCH: f"batch {old.batch_size} -> {new.batch_size}",
            Step.CHUNK: f"{old.chunk_length} s windows -> {new.chunk_length} s",
            Step.GREEDY: f"beam {old.beam_size} -> greedy",
            Step.WORD_TIMESTAMPS: "word timestamps dropped (segments kept)",
        }[step]
        return f"{change}: needs {format_bytes(before.needs)}, {before.budget.why}"

    def cpu_fallback(
        self, current: _Check, degradations: list[Degradation]
    ) -> tuple[_Check, list[Degradation]] | None:
        asked = self.request.shape
        cpu = replace(asked, device="cpu", compute_type=self.policy.cpu_compute_type, batch_size=1)
        reason = (
            f"{asked.device} -> cpu ({self.policy.cpu_compute_type}): {self.shortfall(current)}"
        )
        # The GPU's degradations were for the GPU's sake: try the CPU as asked first.
        as_asked = self.check(cpu)
        if as_asked.fits:
            notes = []
            if asked.batch_size > 1:
                notes.append(Degradation("batch", f"batch {asked.batch_size} -> 1 on the CPU"))
            notes.append(Degradation("cpu", reason))
            return as_asked, notes
        degraded = self.check(
            replace(current.shape, device="cpu", compute_type=cpu.compute_type, batch_size=1)
        )
        if degraded.shape != as_asked.shape and degraded.fits:
            notes = list(degradations)
            if current.shape.batch_size > 1:
                notes.append(
                    Degradation("batch", f"batch {current.shape.batch_size} -> 1 on the CPU")
                )
            notes.append(Degradation("cpu", reason))
            return degraded, notes
        return None


def plan_request(
    request: PlanRequest,
    snapshot: MemorySnapshot,
    policy: Policy,
    *,
    reserved: int,
    cost: CostModel,
    waited: float = 0.0,
    host_reserved: int = 0,
    cpu_load_bytes: int | None = None,
) -> Plan:
    """Decide how to run a request in the memory there is. Pure: no I/O, no clock.

    The shape as asked runs if it fits. Otherwise (``adapt``) the ladder's steps are applied
    cumulatively, in order, each as far as it goes before the next: halve the batch, shorten
    the windows, go greedy, drop word timestamps, wait, fall back to the CPU, reject. ``wait``
    is skipped once ``waited >= policy.max_wait`` and when nothing could ever free enough
    (the device is too small even empty); ``strict`` only runs as asked, waits, or rejects;
    ``off`` runs as asked without checking anything.

    Args:
        request: What the client asked for.
        snapshot: Memory now (``snapshot.device`` is the model's device).
        policy: Limits and the ladder.
        reserved: Bytes reserved on the device by requests already running (for CPU serving,
            on host RAM).
        cost: The model's cost model.
        waited: Seconds this request has already waited for memory.
        host_reserved: Bytes reserved on host RAM by running requests (their audio).
        cpu_load_bytes: Host bytes the CPU fallback must load (0 if a CPU model is resident);
            None assumes the peak of loading it at ``policy.cpu_compute_type``
            (:meth:`CostModel.load_host_bytes`: the file and the converted weights at once).

    Returns:
        The plan. For ``action == "run"`` (outside ``off`` mode),
        ``plan.estimate.device_bytes <= plan.budget``.
    """
    planner = _Planner(
        request,
        snapshot,
        policy,
        reserved=reserved,
        host_reserved=host_reserved,
        cost=cost,
        cpu_load_bytes=cpu_load_bytes,
    )
    asked = planner.check(request.shape)
    if policy.mode == "off":
        return replace(planner.run(asked, []), host_chunk_seconds=max(0.0, request.audio_seconds))
    if asked.fits:
        return planner.run(asked, [])

    can_wait = waited < policy.max_wait
    if policy.mode == "strict":
        if Step.WAIT in policy.ladder and can_wait and planner.could_ever_fit(asked):
            return planner.stop("wait", asked, [], waited)
        return planner.stop("reject", asked, [], waited)

    current = asked
    degradations: list[Degradation] = []
    for step in policy.ladder:
        if step in SHRINK_STEPS:
            if current.device_ok:
                continue  # host RAM is short: a smaller device shape would not help
            current, note = planner.shrink(step, current)
            if note is not None:
                degradations.append(note)
            if current.fits:
                return planner.run(current, degradations)
        elif step is Step.WAIT:
            if can_wait and planner.could_ever_fit(current):
                return planner.stop("wait", current, degradations, waited)
        elif step is Step.CPU:
            if policy.cpu_fallback and request.shape.device != "cpu":
                fallback = planner.cpu_fallback(current, degradations)
                if fallback is not None:
                    return planner.run(*fallback)
        else:  # Step.REJECT
            break
    return planner.stop("reject", current, degradations, waited)
