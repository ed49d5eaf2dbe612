"""A request as the memory gate sees it: the shape it asks for, and its pieces planned.

The request factory decides a request's options once (:class:`~server.request.Job`); here they
meet the server's settings and the model: how long its windows are, whether its windows batch
(and how many), whether it decodes through the cross-request scheduler or alone. Each piece is
then planned by the gate, and what the plan needs is reserved in the piece's own scope.
"""

from __future__ import annotations

import math
import threading
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from server.config import Settings
from server.engine.pool import LoadedModel, ModelPool
from server.engine.report import Decisions
from server.errors import InsufficientMemoryError
from server.memory import Plan, PlanRequest, Shape, device_kind
from server.memory.gate import HOST, MemoryGate, batched_key
from server.request import Job


class RequestPlanner:
    """Shapes and plans requests (see the module doc).

    Args:
        settings: Batching, chunk length, piece length, the ladder.
        gate: Plans and reserves.
        pool: Whether a CPU copy of a model is loaded (the CPU fallback costs its load if not).
        decisions: Where each plan is recorded.
    """

    def __init__(
        self, settings: Settings, gate: MemoryGate, pool: ModelPool, decisions: Decisions
    ) -> None:
        self.settings = settings
        self.gate = gate
        self.pool = pool
        self.decisions = decisions
        #: The largest batch of windows (WHISPER_BATCH_SIZE, or the device's default).
        self.largest_batch = 4
        self._sequential = threading.BoundedSemaphore(settings.max_concurrency)

    def requested_shape(self, model: LoadedModel, job: Job, duration: float | None = None) -> Shape:
        """The shape the client's options ask for, before any planning.

        Args:
            model: The model it runs on.
            job: The client's options.
            duration: Seconds of audio; the job's own (exact or declared) by default, and a
                long file when neither is known.
        """
        seconds = duration if duration is not None else job.duration
        if seconds is None:
            seconds = self.settings.max_piece_duration + self.settings.chunk_length
        chunk_length = min(self.settings.chunk_length, job.chunk_length or 30)
        windows = math.ceil(seconds / chunk_length)
        # Long files decode their own windows in batches; short ones run sequentially so that
        # each window is conditioned on the text before it, exactly as faster-whisper does.
        mode = self.settings.batching
        batch = 1
        if mode == "on" or (mode == "auto" and windows > 2):
            batch = min(self.largest_batch, windows)
        return job.shape(
            device=device_kind(model.device),
            compute_type=model.compute_type,
            batch_size=batch,
            chunk_length=chunk_length,
            windowed=self.windowed(job),
        )

    def windowed(self, job: Job) -> bool:
        """Whether a request that holds a sequential slot is decoded window by window, as the
        scheduler does (in its own thread, a batch of one), rather than by faster-whisper's
        ``transcribe``.

        With batching on or ``auto`` it always is: a request then gets the same text whether it
        ran alone or shared a batch, since both run one procedure. With batching off, only
        requests for token log-probabilities are, since only that procedure scores tokens.
        """
        return self.settings.batching != "off" or job.logprobs

    def sequential_slot(self, shape: Shape, job: Job) -> ExitStack | None:
        """A sequential slot (faster-whisper's own path: exactly its results, each window
        conditioned on the text before it), or None for the cross-request scheduler.

        WHISPER_BATCHING=auto: long files (planned with a batch) go to the scheduler; a short
        request takes a sequential slot if one is free, and joins the scheduler's shared batches
        rather than queueing when all are busy. A live session's decode is decoded in its own
        thread even then (a slot outside the count): queued, it would wait for the batch the
        worker is running, which on the CPU takes seconds; beside it, the scheduler lets it
        go first (:mod:`server.batching.policy`). The sessions bound how many there are
        (WHISPER_REALTIME_MAX_SESSIONS, one decode each at a time), and each is planned and
        reserved like any request.
        """
        mode = self.settings.batching
        if mode == "on" or (mode == "auto" and shape.batch_size > 1):
            return None
        if not self._sequential.acquire(blocking=mode == "off"):
            return ExitStack() if job.work_class.live and shape.batched else None
        slot = ExitStack()
        slot.callback(self._sequential.release)
        return slot

    def plan_piece(
        self,
        model: LoadedModel,
        shape: Shape,
        audio_seconds: float,
        job: Job,
        held: ExitStack,
        *,
        scheduled: bool = False,
    ) -> Plan:
        """Plan one piece through the gate and reserve what the plan needs, as one step under
        the ledger's lock (so two requests never spend the same free memory); the gate waits,
        bounded, while the planner says memory may free up. The reservations go into ``held``,
        the caller's scope for the piece, the moment they are made.

        A request headed for the scheduler reserves, besides its piece's host memory, the
        working memory of one of its windows (under the batched key): what its windows need to
        make progress in a batch of their own. The batches they join spend those reservations
        (see :class:`~server.memory.batch_budget.BatchBudget`). The plan still checks the
        request's own shape, where its degradations are decided.

        Raises:
            InsufficientMemoryError: the planner rejected the request.
        """
        plan, waited = self.gate.plan(
            model.device,
            model.cost,
            PlanRequest(shape=shape, audio_seconds=audio_seconds),
            self.settings.degrade_ladder,
            **self._terms(model, job),
            on_run=lambda plan: self._reserve(model, job, plan, held, scheduled=scheduled),
            keep=model,
        )
        self.decisions.record(job, plan, waited, model.device, audio_seconds)
        if plan.action == "reject":
            raise InsufficientMemoryError(
                "Not enough memory to run this request now "
                f"({plan.why or 'no memory'}); retry after the delay in Retry-After.",
                retry_after=plan.retry_after or self.settings.retry_after,
            )
        return plan

    def plan_ahead(
        self, model: LoadedModel, shape: Shape, audio_seconds: float, job: Job, held: ExitStack
    ) -> Plan | None:
        """Plan and reserve the next piece of a request headed for the scheduler while its
        current piece still holds its own memory, only if the memory free now runs it as it
        is, on its model's device: no wait, no degradation, no eviction. None otherwise (the
        piece is then planned as usual once the current one has given its memory back)."""
        with self.gate.reservations.planning():
            plan = self._plan_now(model, job, PlanRequest(shape, audio_seconds))
            if (
                plan.action != "run"
                or plan.degradations
                or plan.shape != shape
                or plan.device != device_kind(model.device)
            ):
                return None
            self._reserve(model, job, plan, held, scheduled=True)
        self.decisions.record(job, plan, 0.0, model.device, audio_seconds)
        return plan

    def _reserve(
        self, model: LoadedModel, job: Job, plan: Plan, held: ExitStack, *, scheduled: bool
    ) -> None:
        """Reserve what ``plan`` needs into ``held`` (under the ledger's planning lock)."""
        ledger = self.gate.reservations
        # The plan names the kind of device; the reservation is on the model's own GPU.
        place = model.device if plan.device == device_kind(model.device) else plan.device
        key, working = place, plan.reserve_bytes
        if scheduled:
            one = replace(plan.shape, batch_size=1)
            key, working = batched_key(place), model.cost.estimate(one).device_bytes
        owner = job.request_id
        held.enter_context(ledger.reserve(key, working, owner, job.api_key))
        held.enter_context(ledger.reserve(HOST, plan.host_bytes, owner, job.api_key))

    def check(self, model: LoadedModel, job: Job, seconds: float) -> Plan | None:
        """What the gate would decide now for ``seconds`` of ``job``'s audio on ``model``,
        reserving nothing and not waiting.

        Returns:
            The plan (``run``, ``wait`` or ``reject``); None for a rejection that unloading an
            idle model could turn around (the work itself tries that).
        """
        request = PlanRequest(self.requested_shape(model, job, seconds), seconds)
        with self.gate.reservations.planning():
            plan = self._plan_now(model, job, request)
        if plan.action == "reject" and self.gate.could_evict(model.device, keep=model):
            return None
        return plan

    def _plan_now(self, model: LoadedModel, job: Job, request: PlanRequest) -> Plan:
        """The gate's decision for ``request`` now, without waiting or reserving (call under
        the ledger's planning lock)."""
        return self.gate.plan_now(
            model.device,
            model.cost,
            request,
            self.settings.degrade_ladder,
            **self._terms(model, job),
        )

    def _terms(self, model: LoadedModel, job: Job) -> dict[str, Any]:
        """How a request's plan on ``model`` counts memory: what is reserved on its device
        (requests alone and the scheduler's batches), and whether the CPU fallback must load a
        copy of the model first."""
        cpu_copy = self.pool.find(job.source, "cpu") is not None
        return {
            "reserved_keys": (model.device, batched_key(model.device)),
            "cpu_load_bytes": 0 if cpu_copy or model.device == "cpu" else None,
        }


__all__ = ["RequestPlanner"]
