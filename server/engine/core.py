"""The engine: runs a planned request piece by piece, and re-plans when memory runs out.

One request goes: the audio is cut into pieces that fit host RAM (at pauses) -> for every piece
the planner reads the memory probe and returns a Plan -> the piece runs under a memory
reservation, decoded window by window (alone in a sequential slot, or in the cross-request
scheduler's batches: one procedure, so one text) or, with batching off, by faster-whisper's
sequential ``transcribe`` -> an out-of-memory error raises the cost estimate for that shape,
steps the plan one rung down the ladder and resumes from the last finished segment. All of this
is blocking code run in worker threads; the serving layer calls :meth:`Engine.run` from the
event loop.

What lives elsewhere: the request's options (:mod:`server.request`), the queue and its 429s
loaded models (:mod:`server.engine.residency`), every call into
faster-whisper (:mod:`server.whisper.runner`), batching policy (:mod:`server.batching.scheduler`), and the
planner, its ladder and the reservation ledger (:mod:`server.memory`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import numpy as np
import psutil

from server.audio.pieces import Piece, PieceReader
from server.batching.scheduler import (
    BatchFailedError,
    BatchKey,
    QueueFullError,
    Scheduler,
    SchedulerStats,
)
from server.config import Settings
from server.diarization import Diarizer, SpeakerEncoder, load_encoder, speaker_shortfall
from server.engine.residency import LoadedModel, LoadNeeds, ModelPool
from server.engine.store import ModelSource, ModelStore, install_speaker_encoder
from server.errors import (
    APIError,
    ConflictError,
    InsufficientMemoryError,
    ModelNotReadyError,
    NotFoundError,
    RateLimitError,
    RequestCancelledError,
)
from server.memory import (
    Budget,
    Degradation,
    MemoryProbe,
    MemorySnapshot,
    Plan,
    PlanRequest,
    Policy,
    ProbeUnavailable,
    Reservation,
    Reservations,
    Shape,
    Step,
    cuda_available,
    device_kind,
    format_bytes,
    memory_budget,
    open_probe,
    plan_request,
    step_down,
)
from server.memory.host_heap import release_freed_memory
from server.request import Job
from server.transcript import Segment, Transcript
from server.whisper.runner import (
    SAMPLE_RATE,
    has_speech,
    is_out_of_memory,
    loud_for_vad,
    speech_timestamps,
    to_segment,
)
from server.whisper.word_timing import fit_segments, speech_spans

logger = logging.getLogger(__name__)

HOST = "host"  # reservation key for request buffers in host RAM
_MAX_OOM_RETRIES = 4
_MIN_PIECE_SAMPLES = SAMPLE_RATE // 100  # shorter than 10 ms: nothing to transcribe
# A piece may run this far past its planned length rather than leave a sliver after it (a
# header's duration is rounded; a tail this short is no piece of its own).
_PIECE_SLACK_S = 1.0
# Silero VAD as the scheduler cuts windows with it (faster-whisper's batched defaults).
_SPEECH_GATE = {"min_silence_duration_ms": 160}
# A sequential piece longer than two windows in which the VAD hears speech less than half the
# time is decoded with the VAD filter on (shorter ones stay exactly faster-whisper's results).
_SPARSE_CHECK_SAMPLES = 60 * SAMPLE_RATE
_SPARSE_SPEECH = 0.5


@dataclass
class EngineStats:
    """Counters and recent decisions, for /v1/memory and /metrics."""

    degradations: Counter[str] = field(default_factory=Counter)
    oom_recoveries: int = 0
    rejected: int = 0
    unloads: int = 0
    waits: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    running: int = 0
    """Requests inside :meth:`Engine.run` now (planned, decoding or waiting for memory)."""
    waiting_for_memory: int = 0
    """Plans (a request's piece, or a scheduler's batch) waiting for memory to free up."""


class Engine:
    """Runs jobs: plans them against live memory readings and executes the plans.

    Args:
        settings: The server's settings.
        store: Resolves model names (by default, from the settings).
    """

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store or ModelStore.from_settings(settings)
        self.pool = ModelPool(settings, gate=self._room_for_load)
        self.reservations = Reservations()
        self.stats = EngineStats()
        self.device = "cpu"  # the kind: cuda or cpu
        #: Where models run: the GPUs of WHISPER_DEVICE_INDEX (``cuda:0``, ``cuda:1``) or ``cpu``.
        self.places: list[str] = ["cpu"]
        self.device_reason = "not started"
        self.served: ModelSource | None = None
        self.load_error: str | None = None
        self._probes: dict[str, MemoryProbe] = {}
        # Threads mostly wait (on the scheduler or the sequential slots), so there is one per
        # admitted request; the model work itself is bounded by the slots and the scheduler.
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_queue, thread_name_prefix="whisper"
        )
        self._sequential = threading.BoundedSemaphore(settings.max_concurrency)
        self._schedulers: dict[int, Scheduler] = {}
        self._scheduler_lock = threading.Lock()
        self._counting = threading.Lock()  # guards the stats' running/waiting gauges
        # The running batch's reservation, per model (each model's scheduler runs one at a time).
        self._batch_reservations: dict[int, Reservation] = {}
        self.on_plan: Callable[[Plan], None] | None = None  # metrics hook
        self._started = False
        self.started_at = time.time()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        #: Reads what this process holds on the host outside any reservation; by default its
        #: resident memory. Counted against WHISPER_HOST_MEMORY_LIMIT (see :meth:`settle`).
        self.footprint: Callable[[], int] = _process_rss
        #: The last reading of :attr:`footprint` taken with nothing running.
        self.idle_host_bytes = 0
        self._speaker_encoder: SpeakerEncoder | None = None
        self._speaker_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Pick the device and load the served model (blocking; run at start-up)."""
        wanted = self.settings.device
        ok, reason = (
            cuda_available() if wanted in ("auto", "cuda") else (False, "WHISPER_DEVICE=cpu")
        )
        if wanted == "cuda" and not ok:
            self.load_error = f"WHISPER_DEVICE=cuda but no usable GPU: {reason}"
            logger.error("%s", self.load_error)
            return
        self.device = "cuda" if ok else "cpu"
        self.places = [f"cuda:{i}" for i in self.settings.device_index] if ok else ["cpu"]
        self.device_reason = reason
        try:
            self.served = self.store.default_source()
            self._load_served()
        except ModelNotReadyError as exc:
            self.load_error = exc.message
            logger.error("model not ready: %s", exc.message)
        release_freed_memory()  # loading parses files and converts weights; keep none of that
        self.settle()
        self._started = True
        if self.settings.model_ttl > 0:
            self._reaper = threading.Thread(
                target=self._unload_expired, name="whisper-model-ttl", daemon=True
            )
            self._reaper.start()

    def _load_served(self) -> None:
        """Load the served model on the chosen device. On CUDA, one window must also run there
        (counting devices and loading cuBLAS do not prove a kernel runs: a wrong cuBLAS, a driver
        too old for the wheel's PTX); if it does not, ``auto`` falls back to the CPU and says
        why in ``device_reason``, and ``cuda`` fails the start.

        Raises:
            ModelNotReadyError: the model cannot be loaded.
        """
        assert self.served is not None
        if self.device == "cuda":
            try:
                first = self.places[0]
                self.pool.get(self.served, first, pinned=self._pin).runner.run_one_window()
                logger.info("device: cuda (%s; a test window ran on it)", self.device_reason)
                return
            except ModelNotReadyError as exc:
                if exc.__cause__ is None:  # not in the store: no device would help
                    raise
                failure = exc.message
            except Exception as exc:  # CTranslate2 raises RuntimeError, ValueError, ...
                failure = f"a test window failed on CUDA: {exc}"
            self.pool.discard(self.served, first)
            if self.settings.device == "cuda":
                raise ModelNotReadyError(f"WHISPER_DEVICE=cuda but {failure}")
            self.device, self.places = "cpu", ["cpu"]
            self.device_reason = f"{self.device_reason}, but {failure}; running on the CPU"
            logger.warning("device: cpu (%s)", self.device_reason)
        else:
            logger.info("device: %s (%s)", self.device, self.device_reason)
        self.pool.get(self.served, self.places[0], pinned=self._pin)

    @property
    def _pin(self) -> bool:
        return self.settings.pin_default_model

    def speaker_encoder(self) -> SpeakerEncoder:
        """The speaker encoder for diarization, installed into the model store and loaded on
        first use (blocking).

        Raises:
            DiarizationUnavailableError: its weights are not installed (400, with the command
                that installs them).
        """
        with self._speaker_lock:
            if self._speaker_encoder is None:
                started = time.perf_counter()
                encoder = load_encoder(install_speaker_encoder(self.settings.models_dir))
                logger.info(
                    "loaded the speaker encoder in %.2fs (%.1f MB)",
                    time.perf_counter() - started,
                    encoder.weights_bytes / 1e6,
                )
                self._speaker_encoder = encoder
            return self._speaker_encoder

    def settle(self) -> None:
        """With nothing running, read the process's resident memory: what it holds outside
        any reservation, counted against WHISPER_HOST_MEMORY_LIMIT. Called at start-up and
        when a request ends; a reading taken while anything is reserved is skipped."""
        with self.reservations.planning():
            if not self.reservations.snapshot():
                self.idle_host_bytes = self.footprint()

    @property
    def ready(self) -> bool:
        """The served model loaded at start-up (it may be unloaded since, when not pinned, and
        is loaded again by the next request)."""
        return self.served is not None and self.load_error is None and self._started

    def served_model(self) -> ModelSource:
        """The served model: the one place that says whether the server can take work.

        Raises:
            ModelNotReadyError: it failed to load, or the server is still starting (503 with
                Retry-After).
        """
        if self.served is None or self.load_error is not None:
            raise ModelNotReadyError(
                f"The model is not loaded: {self.load_error or 'still starting'}.",
                retry_after=self.settings.retry_after,
            )
        return self.served

    def resolve(self, name: str | None) -> ModelSource:
        """The model a request names (``whisper-1``, an alias, a folder, a repo id), or the
        served one when it names none.

        Raises:
            ModelNotReadyError: as :meth:`served_model`.
            ModelNotFoundError: no such model.
        """
        served = self.served_model()
        return self.store.resolve(name, served) if name else served

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=10)
        self._executor.shutdown(wait=True, cancel_futures=False)
        with self._scheduler_lock:
            for scheduler in self._schedulers.values():
                scheduler.close(timeout=30)
            self._schedulers.clear()

    def scheduler_stats(self) -> list[SchedulerStats]:
        with self._scheduler_lock:
            return [s.stats() for s in self._schedulers.values()]

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._executor

    @property
    def batch_size(self) -> int:
        """The largest batch of windows (WHISPER_BATCH_SIZE, or the device's default)."""
        return self.settings.batch_size or (8 if self.device == "cuda" else 4)

    def hold_upload(self, nbytes: int, owner: str, api_key: str | None = None) -> Reservation:
        """Count an upload held in memory against host RAM until the reservation is released.

        It is already in memory, so it is counted, never refused: what it takes is what later
        plans no longer see as free. ``api_key``: the id of the key ``owner`` came with.
        """
        return self.reservations.reserve(HOST, nbytes, owner, api_key)

    def release_leftovers(self, owner: str) -> None:
        """Once a request has ended (its worker stopped), release whatever it still holds in
        the ledger, and say so: every path should have released its own, so anything found
        here is a bug, but not one that shrinks the budget for every later request."""
        for reservation in self.reservations.release_owner(owner):
            logger.error("request %s ended holding %r; released it", owner, reservation)

    def reserved_bytes(self, device: str) -> int:
        """Memory reserved on ``device`` now: by sequential requests, by requests waiting in the
        scheduler, and by the batch running beyond what those requests hold."""
        return self.reservations.total(device) + self.reservations.total(batched_key(device))

    # ---- models: loaded under the planner, held while used, unloaded when idle -------------

    @contextmanager
    def use_model(
        self, source: ModelSource, device: str | None = None, *, planned: bool = False
    ) -> Iterator[LoadedModel]:
        """Hold ``source`` on ``device`` (the serving device by default) for the block,
        loading it first if needed (planned like a request: see :meth:`_room_for_load`). A
        held model is never unloaded. ``planned``: the caller's plan already reserved room to
        load it (the CPU fallback's plan counts its CPU copy).

        Raises:
            ModelNotReadyError: it cannot be loaded.
            InsufficientMemoryError: there is no room to load it, even after unloading idle
                models and waiting (WHISPER_MAX_MEMORY_WAIT).
        """
        model = self.pool.checkout(
            source, device or self.places[0], pinned=self._pinned(source), planned=planned
        )
        try:
            yield model
        finally:
            self.pool.release(model)
            if model.unload_requested:
                self.unload(model, "unload requested")
            elif self.settings.model_ttl == 0:
                self.unload(model, "WHISPER_MODEL_TTL=0")

    def load(self, source: ModelSource) -> LoadedModel:
        """Load ``source`` on the serving device now (``POST /v1/models/{id}``), planned like
        a request's load; its idle time starts now.

        Raises:
            ModelNotReadyError, InsufficientMemoryError: as :meth:`use_model`.
        """
        with self.use_model(source) as model:
            return model

    def unload_source(self, source: ModelSource) -> list[LoadedModel]:
        """Unload every copy of ``source`` (``DELETE /v1/models/{id}``); a copy in use is
        unloaded as soon as its last request ends.

        Returns:
            The copies still held (to be unloaded when they are let go).

        Raises:
            NotFoundError: it is not loaded.
            ConflictError: it is the pinned served model.
        """
        copies = [m for m in self.pool.loaded() if m.source.load_target == source.load_target]
        if not copies:
            raise NotFoundError(f"The model {source.id!r} is not loaded.", param="model")
        if any(m.pinned for m in copies):
            raise ConflictError(
                f"The model {source.id!r} is the served model and is pinned; set "
                "WHISPER_PIN_DEFAULT_MODEL=false to let it be unloaded.",
                param="model",
            )
        held = []
        for model in copies:
            model.unload_requested = True
            if not self.unload(model, "unload requested"):
                held.append(model)
        return held

    def _pinned(self, source: ModelSource) -> bool:
        served = self.served
        return self._pin and served is not None and source.load_target == served.load_target

    def unload(self, model: LoadedModel, reason: str) -> bool:
        """Unload ``model`` now if nothing holds it and it is not pinned.

        Returns:
            Whether it was unloaded.
        """
        if not self.pool.take_idle(model):
            return False
        with self._scheduler_lock:
            scheduler = self._schedulers.pop(id(model), None)
        if scheduler is not None:
            scheduler.close(timeout=30)
        model.runner.whisper.model.unload_model()
        if model.device == "cpu":
            # What the process holds drops by the weights; settle() reads the exact figure
            # when nothing is reserved, which may not be now.
            with self.reservations.planning():
                self.idle_host_bytes = max(0, self.idle_host_bytes - model.weights_bytes)
        release_freed_memory()
        self.settle()
        self.stats.unloads += 1
        logger.info(
            "unloaded model %s from %s (%s of weights): %s",
            model.source.id,
            model.device,
            format_bytes(model.weights_bytes),
            reason,
        )
        return True

    def _unload_expired(self) -> None:
        """Unload models idle for WHISPER_MODEL_TTL seconds (a daemon thread, until close)."""
        ttl = self.settings.model_ttl
        while not self._stop.wait(min(max(ttl / 4, 0.2), 10.0)):
            now = time.monotonic()
            for model in self.pool.idle():
                idle = now - model.last_used
                if idle >= ttl:
                    self.unload(model, f"idle for {idle:.0f} s (WHISPER_MODEL_TTL={ttl:g})")

    def free_budget(self, device: str, snapshot: MemorySnapshot | None = None) -> Budget:
        """What new work (a model load, a request) may use on ``device`` now: the planner's own
        budget, ``min(free - reserved - headroom, limit - resident - reserved)`` (call under the
        ledger's lock). ``snapshot``: a reading of ``device`` taken already."""
        snapshot = snapshot or self.probe(device).snapshot()
        if device_kind(device) == "cuda":
            policy = self.policy(device)
            return memory_budget(
                snapshot.device,
                headroom=policy.device_headroom,
                limit=policy.device_limit,
                resident=policy.resident_bytes,
                reserved=self.reserved_bytes(device),
            )
        return self._host_budget(snapshot)

    def _host_budget(self, snapshot: MemorySnapshot) -> Budget:
        """Host RAM new work may use, from any device's reading (each reads the host too)."""
        policy = self.policy("cpu")
        return memory_budget(
            snapshot.host,
            headroom=policy.host_headroom,
            limit=policy.host_limit,
            resident=policy.host_resident_bytes,
            reserved=self.reservations.total(HOST) + self.reserved_bytes("cpu"),
        )

    @contextmanager
    def _room_for_load(self, device: str, model_id: str, needs: LoadNeeds) -> Iterator[None]:
        """Plan a model load as a request is planned, with what the load really takes: room on
        ``device`` for its weights and one window's work, and host RAM for its peak while it
        loads (the file's tensors and their converted copies at once: on the CPU that is more
        than twice the weights). Where either does not fit, idle models there are unloaded
        first (least recently used first), before the load, not after it; then it waits
        (bounded by WHISPER_MAX_MEMORY_WAIT), then it is refused. The peak and the weights stay
        reserved while it loads, so concurrent plans do not spend the same memory. Loads at
        start-up (the served model) and under WHISPER_MEMORY_POLICY=off are not planned.

        Raises:
            InsufficientMemoryError: no room, after unloading and waiting.
        """
        if not self._started or self.settings.memory_policy == "off":
            yield
            return
        on_gpu = device_kind(device) == "cuda"
        # On the CPU the device is host RAM: the load's peak and its lasting need share it.
        host_need = (
            needs.host_peak_bytes if on_gpu else max(needs.host_peak_bytes, needs.device_bytes)
        )
        waited = 0.0
        while True:
            since = self.reservations.generation
            held = ExitStack()
            with self.reservations.planning():
                short = self._load_shortfall(device, needs.device_bytes, host_need)
                if short is None:
                    if on_gpu:
                        held.enter_context(
                            self.reservations.reserve(
                                device, needs.weights_bytes, f"load:{model_id}"
                            )
                        )
                    held.enter_context(
                        self.reservations.reserve(HOST, host_need, f"load:{model_id}")
                    )
            if short is None:
                break
            place, need, budget = short
            idle = self.pool.idle(place)
            if idle:
                self.unload(
                    idle[0],
                    f"to make room for loading {model_id} ({format_bytes(need)} needed on "
                    f"{place}, {budget.why})",
                )
                continue
            if waited >= self.settings.max_memory_wait:
                where = "of host RAM while it loads" if place == "cpu" else f"on {place}"
                raise InsufficientMemoryError(
                    f"Not enough memory to load model {model_id!r} on {device}: it needs about "
                    f"{format_bytes(need)} {where} and {budget.why}; retry after the delay in "
                    "Retry-After.",
                    retry_after=self.settings.retry_after,
                )
            started = time.monotonic()
            self.reservations.wait_for_release(timeout=0.5, since=since)
            waited += time.monotonic() - started
        with held:
            yield
        if device == "cpu":
            # The weights are now part of what the process holds outside reservations; count
            # them at once, as settle() would if nothing else were running.
            with self.reservations.planning():
                self.idle_host_bytes += needs.weights_bytes
        release_freed_memory()  # loading parses files and converts weights; keep none of that

    def _load_shortfall(
        self, device: str, device_need: int, host_need: int
    ) -> tuple[str, int, Budget] | None:
        """Where a load does not fit now (the place, what it needs there and the budget
        there), or None when it fits everywhere (call under the ledger's lock)."""
        snapshot = self.probe(device).snapshot()
        if device_kind(device) == "cuda":
            budget = self.free_budget(device, snapshot)
            if device_need > budget.amount:
                return device, device_need, budget
        host = self._host_budget(snapshot)
        if host_need > host.amount:
            return "cpu", host_need, host
        return None

    # ---- memory ---------------------------------------------------------------------------

    def probe(self, device: str) -> MemoryProbe:
        if device not in self._probes:
            self._probes[device] = open_probe(device, self.settings.device_index[0])
        return self._probes[device]

    def policy(self, device: str) -> Policy:
        """The planner's limits for work on ``device``. What this process holds outside any
        reservation counts against the limits: on a GPU the weights of the models loaded there,
        and on the host the process's idle resident memory (the runtime, libraries and CPU
        models), as last seen with nothing running."""
        s = self.settings
        return Policy(
            mode=s.memory_policy,
            ladder=s.degrade_ladder,
            device_limit=s.gpu_memory_limit,
            device_headroom=s.gpu_headroom,
            host_limit=s.host_memory_limit,
            host_headroom=s.host_headroom,
            max_wait=s.max_memory_wait,
            cpu_fallback=s.cpu_fallback and self.device == "cuda",
            retry_after=s.retry_after,
            resident_bytes=self.pool.resident_bytes(device) if device_kind(device) == "cuda" else 0,
            host_resident_bytes=self.idle_host_bytes,
        )

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
            batch = min(self.batch_size, windows)
        return job.shape(
            device=device_kind(model.device),
            compute_type=model.compute_type,
            batch_size=batch,
            chunk_length=chunk_length,
            windowed=self._windowed(job),
        )

    def _plan(
        self,
        model: LoadedModel,
        shape: Shape,
        audio_seconds: float,
        job: Job,
        held: ExitStack,
        *,
        scheduled: bool = False,
    ) -> Plan:
        """Plan one piece and reserve what the plan needs, as one step under the ledger's lock
        (so two requests never spend the same free memory); wait, bounded, while the planner
        says memory may free up. The reservations go into ``held``, the caller's scope for the
        piece, the moment they are made.

        A request headed for the scheduler reserves, besides its piece's host memory, the
        working memory of one of its windows (under the batched key): what its windows need to
        make progress in a batch of their own. The batches they join spend those reservations
        (one batch runs at a time per model) and reserve only what a larger batch needs beyond
        them, so requests waiting in the scheduler never each hold a whole batch's worth. The
        plan still checks the request's own shape, where its degradations are decided.

        Returns:
            The plan.

        Raises:
            InsufficientMemoryError: the planner rejected the request.
        """

        def reserve(plan: Plan) -> None:
            # The plan names the kind of device; the reservation is on the model's own GPU.
            place = model.device if plan.device == device_kind(model.device) else plan.device
            key, working = place, plan.reserve_bytes
            if scheduled:
                one = replace(plan.shape, batch_size=1)
                key, working = batched_key(place), model.cost.estimate(one).device_bytes
            owner = job.request_id
            held.enter_context(self.reservations.reserve(key, working, owner, job.api_key))
            held.enter_context(self.reservations.reserve(HOST, plan.host_bytes, owner, job.api_key))

        plan, waited = self._decide(
            model,
            PlanRequest(shape=shape, audio_seconds=audio_seconds),
            self.settings.degrade_ladder,
            **self._request_terms(model, job),
            on_run=reserve,
        )
        self._record(job, plan, waited, model.device, audio_seconds)
        if plan.action == "reject":
            self.stats.rejected += 1
            raise InsufficientMemoryError(
                "Not enough memory to run this request now "
                f"({plan.why or 'no memory'}); retry after the delay in Retry-After.",
                retry_after=plan.retry_after or self.settings.retry_after,
            )
        return plan

    def _record(
        self, job: Job, plan: Plan, waited: float, place: str, audio_seconds: float
    ) -> None:
        """One decision for /v1/memory and the metrics."""
        self.stats.recent.append(
            {
                "request_id": job.request_id,
                "api_key": job.api_key,
                "at": time.time(),
                "action": plan.action,
                "device": place if plan.device == device_kind(place) else plan.device,
                "batch_size": plan.shape.batch_size,
                "beam_size": plan.shape.beam_size,
                "word_timestamps": plan.shape.word_timestamps,
                "chunk_length": plan.shape.chunk_length,
                "estimate_bytes": plan.estimate.device_bytes,
                "budget_bytes": plan.budget,
                "waited_s": round(waited, 3),
                "degradations": [d.kind for d in plan.degradations],
                "model": job.source.id,
                "task": job.task,
                "audio_seconds": round(audio_seconds, 3),
                "reasons": [d.reason for d in plan.degradations],
                "reason": plan.reason,
                # Filled in when the request ends (see _finish); present from the start so
                # that a reader serializing the dict never sees its size change.
                "outcome": None,
            }
        )
        if self.on_plan is not None:
            self.on_plan(plan)

    def _decide(
        self,
        model: LoadedModel,
        request: PlanRequest,
        steps: tuple[Step, ...],
        *,
        reserved_keys: tuple[str, ...],
        cpu_load_bytes: int | None,
        on_run: Callable[[Plan], None] | None = None,
    ) -> tuple[Plan, float]:
        """Plan against a fresh memory reading until the planner runs or rejects, waiting
        (bounded by the policy) while it says memory may free up. Reading, planning and
        ``on_run`` (the caller's reservations) happen under the ledger's lock, as one step.

        Returns:
            The final plan (``run`` or ``reject``) and the seconds spent waiting.
        """
        waited = 0.0
        evicted: list[Degradation] = []
        counted = False
        with ExitStack() as waiting:
            while True:
                since = self.reservations.generation
                evict: LoadedModel | None = None
                with self.reservations.planning():
                    plan = self._plan_now(
                        model,
                        request,
                        steps,
                        reserved_keys=reserved_keys,
                        cpu_load_bytes=cpu_load_bytes,
                        waited=waited,
                    )
                    if plan.action != "run" or plan.degradations:
                        # The first rung: an idle model's memory, before anything is degraded.
                        idle = self.pool.idle(model.device, exclude=model)
                        evict = idle[0] if idle and self.settings.memory_policy != "off" else None
                    if evict is None and plan.action == "run" and on_run is not None:
                        on_run(plan)
                if evict is not None:
                    why = plan.why
                    if self.unload(evict, f"to make room for a request: {why}"):
                        evicted.append(
                            Degradation(
                                "evict",
                                f"unloaded idle model {evict.source.id} from {evict.device} "
                                f"({format_bytes(evict.weights_bytes)}) to make room: {why}",
                            )
                        )
                    continue
                if plan.action != "wait":
                    if evicted:
                        plan = replace(plan, degradations=(*evicted, *plan.degradations))
                    return plan, waited
                self.stats.waits += 1
                if not counted:  # once, from the first wait until it runs or is rejected
                    waiting.enter_context(self._counted("waiting_for_memory"))
                    counted = True
                started = time.monotonic()
                self.reservations.wait_for_release(timeout=min(plan.wait_s, 0.5), since=since)
                waited += time.monotonic() - started

    def _request_terms(self, model: LoadedModel, job: Job) -> dict[str, Any]:
        """How a request's plan on ``model`` counts memory: what is reserved on its device
        (requests alone and the scheduler's batches), and whether the CPU fallback must load a
        copy of the model first."""
        cpu_copy = self.pool.find(job.source, "cpu") is not None
        return {
            "reserved_keys": (model.device, batched_key(model.device)),
            "cpu_load_bytes": 0 if cpu_copy or model.device == "cpu" else None,
        }

    def _plan_now(
        self,
        model: LoadedModel,
        request: PlanRequest,
        steps: tuple[Step, ...],
        *,
        reserved_keys: tuple[str, ...],
        cpu_load_bytes: int | None,
        waited: float,
    ) -> Plan:
        """The planner's decision against a fresh reading of ``model``'s device, counting what
        is reserved under ``reserved_keys`` (call under the ledger's lock)."""
        return plan_request(
            request,
            self.probe(model.device).snapshot(),
            replace(self.policy(model.device), ladder=steps),
            reserved=sum(self.reservations.total(k) for k in reserved_keys),
            host_reserved=self.reservations.total(HOST),
            cost=model.cost,
            waited=waited,
            cpu_load_bytes=cpu_load_bytes,
        )

    def check(self, job: Job, seconds: float) -> Plan | None:
        """What the planner would decide now for ``seconds`` of ``job``'s audio, reserving
        nothing and not waiting: a check before work that is planned again when it runs (a
        realtime session when it opens).

        Returns:
            The plan (``run``, ``wait`` or ``reject``); None when there is nothing to check
            yet: the model is not loaded here (loading is planned on its own), or a rejection
            that unloading an idle model could turn around (the work itself tries that).
        """
        model = self.pool.find(job.source, self._place_for(job, seconds))
        if model is None:
            return None
        request = PlanRequest(self.requested_shape(model, job, seconds), seconds)
        with self.reservations.planning():
            plan = self._plan_now(
                model,
                request,
                self.settings.degrade_ladder,
                **self._request_terms(model, job),
                waited=0.0,
            )
        evictable = self.settings.memory_policy != "off" and self.pool.idle(
            model.device, exclude=model
        )
        return None if plan.action == "reject" and evictable else plan

    # ---- running --------------------------------------------------------------------------

    def run(
        self,
        job: Job,
        *,
        on_segment: Callable[[Segment, str | None], None] | None = None,
        cancelled: threading.Event | None = None,
        on_decoded: Callable[[], None] | None = None,
    ) -> Transcript:
        """Transcribe ``job`` (blocking), one piece of its audio at a time.

        Each piece is planned against the memory free when it starts, and its host memory (the
        samples being decoded, their features) and working memory are reserved only while it
        runs. The audio is read (decoded) under that reservation, so a long upload never holds
        more than one piece. The text of each piece conditions the next, as sequential decoding
        does across windows.

        Args:
            job: The audio (samples or a stream) and the client's options.
            on_segment: Called with each segment as soon as it is final (streaming), and the
                language given or detected so far.
            cancelled: Set when the client has gone; the job stops at the next window.
            on_decoded: Called once, when the first piece has been decoded: the upload is
                audio, and for a short one every check has passed.

        Returns:
            The transcript, with every change the planner made recorded in ``degradations``.

        Raises:
            ModelNotReadyError, InsufficientMemoryError (503), RateLimitError (the scheduler's
            queue is full), RequestCancelledError (the client went away), AudioError (the
            stream turned out not to be usable audio part way).
        """
        self.served_model()
        with self.use_model(job.source, self._place_for(job)) as model:
            return self._run(model, job, on_segment, cancelled, on_decoded)

    def _place_for(self, job: Job, seconds: float | None = None) -> str:
        """Where a request, or the next piece of one, runs: the only device; or, with several
        GPUs, one whose budget fits the request's shape as asked (a GPU without a copy of the
        model must also fit its weights), preferring one that holds a copy already, then the
        one with the most to spare; if none fits, the one with the largest budget, where the
        planner makes it fit.

        Args:
            job: The request.
            seconds: Audio left to plan for (the next piece); the job's own by default.
        """
        if len(self.places) == 1:
            return self.places[0]
        copies = {
            m.device: m
            for m in self.pool.loaded()
            if m.source.load_target == job.source.load_target
        }
        known = next(iter(copies.values()), None)  # GPU copies share one cost model
        best: tuple[tuple[bool, bool, int], str] | None = None
        for place in self.places:
            try:
                with self.reservations.planning():
                    budget = self.free_budget(place).amount
            except ProbeUnavailable as exc:
                logger.warning("cannot read %s's memory: %s", place, exc.reason)
                continue
            need = 0
            if known is not None:
                shape = self.requested_shape(known, job, seconds)
                need = known.cost.estimate(shape).device_bytes
                need += 0 if place in copies else known.weights_bytes
            # Where it fits; among those, where a copy is loaded already; then the most spare.
            rank = (budget >= need, place in copies, budget - need)
            if best is None or rank > best[0]:
                best = (rank, place)
        return best[1] if best is not None else self.places[0]

    def _run(
        self,
        model: LoadedModel,
        job: Job,
        on_segment: Callable[[Segment, str | None], None] | None,
        cancelled: threading.Event | None,
        on_decoded: Callable[[], None] | None,
    ) -> Transcript:
        run = _Progress(job.language, job.prompt, on_decoded)
        if job.diarization is not None:
            run.diarizer = Diarizer(self.speaker_encoder(), job.diarization)
        # A call recorded with a side per channel is transcribed channel by channel; anything
        # else is one source.
        sources = job.channels or (job.reader(),)
        duration = 0.0
        outcome = "error"
        try:
            with self._counted("running"):
                for channel, source in enumerate(sources):
                    reader = PieceReader(source)
                    run.channel = channel if job.channels else None
                    run.prompt = job.prompt
                    self._run_source(model, job, reader, run, on_segment, cancelled)
                    duration = max(duration, reader.position / SAMPLE_RATE)
            outcome = "ok"
        except APIError as exc:
            outcome = exc.code or str(exc.status)
            raise
        finally:
            run.models.close()
            release_freed_memory()
            self.settle()
            self._finish(job.request_id, outcome)
        segments = run.segments
        if run.diarizer is not None:
            segments = run.diarizer.label(segments, run.channels if job.channels else None)
            segments = [replace(s, id=n) for n, s in enumerate(segments)]
            assert job.diarization is not None
            shortfall = speaker_shortfall(job.diarization, segments, len(job.channels))
            if shortfall is not None:
                # Not a memory degradation (not counted as one), but reported like one.
                run.degraded["speakers"] = shortfall
                logger.warning("request %s: %s", job.request_id, shortfall)
            if job.channels and on_segment is not None:
                # Channels were transcribed one after the other: their segments are streamed
                # once all are known, in time order.
                for segment in segments:
                    on_segment(segment, run.language)
            logger.info(
                "request %s: %d speakers in %d windows%s",
                job.request_id,
                len(run.diarizer.track.speakers),
                run.diarizer.windows,
                f" over {len(job.channels)} channels" if job.channels else "",
            )
        return Transcript(
            task=job.task,
            language=run.language or "en",
            duration=duration,
            segments=tuple(segments),
            degradations=tuple(run.degraded.items()),
        )

    def _run_source(
        self,
        model: LoadedModel,
        job: Job,
        reader: PieceReader,
        run: _Progress,
        on_segment: Callable[[Segment, str | None], None] | None,
        cancelled: threading.Event | None,
    ) -> None:
        """Transcribe one source (the audio, or one channel of it) piece by piece."""
        shape: Shape | None = None  # known once the first piece shows how long the audio is
        while not reader.finished:
            shape = self._run_piece(model, job, reader, shape, run, on_segment, cancelled)
            if shape is None or reader.finished:
                break  # the caller's ``finally`` gives the last piece's memory back
            # The piece's samples, features and working memory are free now: give them back
            # to the kernel, so that RSS (and the planner's next reading) shows it.
            release_freed_memory()
            if run.segments and job.temperature == 0:
                # Carry the text across pieces, as sequential decoding does across windows.
                run.prompt = _context(run.segments)
        if run.pieces > 1:
            reader.log_cuts()
            logger.info(
                "request %s: %.0f s of audio in %d pieces",
                job.request_id,
                reader.position / SAMPLE_RATE,
                run.pieces,
            )

    def _run_piece(
        self,
        model: LoadedModel,
        job: Job,
        reader: PieceReader,
        shape: Shape | None,
        run: _Progress,
        on_segment: Callable[[Segment, str | None], None] | None,
        cancelled: threading.Event | None,
    ) -> Shape | None:
        """Plan, read and transcribe the next piece, retrying down the ladder after an
        out-of-memory error from the last finished segment.

        Returns:
            The shape for the pieces after this one; None when the audio was used up.
        """
        piece: Piece | None = None
        resume = 0  # samples of the piece already transcribed
        attempts = 0
        first = len(run.segments)  # the piece's first segment
        while True:
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelledError("The client closed the request.")
            if piece is None and run.pieces and len(self.places) > 1:
                # Each piece of a long file goes where memory is free now.
                place = self._place_for(job, self._next_piece_seconds(job, reader))
                if place != model.device:
                    model = run.models.enter_context(self.use_model(job.source, place))
            planned = shape or self.requested_shape(model, job)
            if piece is not None:
                seconds = (len(piece.samples) - resume) / SAMPLE_RATE
            else:
                seconds = self._next_piece_seconds(job, reader)
            slot = self._sequential_slot(planned)
            scheduled = slot is None
            # The piece's scope: its slot, its reservations, the samples read under them and
            # a CPU copy of the model, all released when the block ends, however it ends.
            with ExitStack() as held:
                if slot is not None:
                    held.enter_context(slot)
                plan = self._plan(model, planned, seconds, job, held, scheduled=scheduled)
                if piece is None:
                    # Decoded under the plan's host reservation: the piece is what it paid for.
                    piece = reader.next(plan.host_chunk_seconds, slack_s=_PIECE_SLACK_S)
                    if piece is None:
                        return None
                    run.pieces += 1
                    if run.on_decoded is not None:
                        run.on_decoded()
                        run.on_decoded = None
                    if shape is None:
                        known = piece.duration_s if piece.last else None
                        shape = self.requested_shape(model, job, known)
                        if shape != planned:
                            # The audio turned out short (or long): plan it as such.
                            self._finish(job.request_id, "replanned")
                            continue
                self._note(run.degraded, plan, job)
                if plan.device == device_kind(model.device):
                    runner = model
                else:  # the CPU fallback: its copy is held for the piece, like the request's
                    runner = held.enter_context(
                        self.use_model(job.source, plan.device, planned=True)
                    )
                run_on = (
                    partial(self._run_windowed, queued=scheduled)
                    if scheduled or plan.shape.batched
                    else self._run_sequential
                )
                try:
                    produced = run_on(
                        runner,
                        job,
                        plan,
                        piece.samples[resume:],
                        run.language,
                        run.prompt,
                        offset=(piece.start + resume) / SAMPLE_RATE,
                        first_id=len(run.segments),
                        cancelled=cancelled,
                    )
                    for segment, detected in produced:
                        run.language = run.language or detected
                        run.segments.append(segment)
                        run.channels.append(run.channel or 0)
                        if on_segment is not None and run.diarizer is None:
                            on_segment(segment, run.language)
                        resume = min(
                            len(piece.samples), round(segment.end * SAMPLE_RATE) - piece.start
                        )
                    if run.diarizer is not None:
                        # Under the piece's reservation, which counted the diarization's memory.
                        self._diarize_piece(run, piece, first, on_segment)
                    return shape
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    error = exc
            # Out of memory: the piece's memory is given back (above); retry one rung down.
            attempts += 1
            self.stats.oom_recoveries += 1
            failed = plan.shape
            runner.cost = runner.cost.with_correction(failed, 1.5)
            shape = step_down(failed, self.settings.degrade_ladder)
            logger.warning(
                "request %s: out of memory on %s with %s (%s); estimate raised, "
                "retrying from %.1f s with %s",
                job.request_id,
                plan.device,
                failed,
                error,
                (piece.start + resume) / SAMPLE_RATE,
                shape,
            )
            run.degraded.setdefault("oom_retry", f"out of memory with {failed}; retried")
            if run.segments and job.temperature == 0:
                run.prompt = _context(run.segments)
            if attempts > _MAX_OOM_RETRIES:
                raise InsufficientMemoryError(
                    "The device ran out of memory repeatedly; retry later.",
                    retry_after=self.settings.retry_after,
                ) from error

    def _next_piece_seconds(self, job: Job, reader: PieceReader) -> float:
        """How long the next piece will be, for planning before it is decoded: the rest of the
        audio as the header declares it, at most a piece."""
        cap = self.settings.max_piece_duration
        declared = job.duration
        if declared is None:
            return cap
        left = declared - reader.position / SAMPLE_RATE
        # A header that promised less than there is: go on in pieces of the usual length.
        return min(cap, left if left > _PIECE_SLACK_S else self.settings.chunk_length)

    @staticmethod
    def _diarize_piece(
        run: _Progress,
        piece: Piece,
        first: int,
        on_segment: Callable[[Segment, str | None], None] | None,
    ) -> None:
        """Add a transcribed piece's voices to the request's speakers; when streaming one
        source, send its segments labelled (the final transcript is labelled again at the end,
        with the same speakers and splits, and names that may have been confirmed since)."""
        assert run.diarizer is not None
        run.diarizer.add_piece(piece.samples, piece.start_s, channel=run.channel)
        if on_segment is None or run.channel is not None:
            return
        for segment in run.diarizer.label(run.segments[first:]):
            on_segment(replace(segment, id=run.streamed), run.language)
            run.streamed += 1

    def _sequential_slot(self, shape: Shape) -> ExitStack | None:
        """A sequential slot (faster-whisper's own path: exactly its results, each window
        conditioned on the text before it), or None for the cross-request scheduler.

        WHISPER_BATCHING=auto: long files (planned with a batch) go to the scheduler; a short
        request takes a sequential slot if one is free, and joins the scheduler's shared batches
        rather than queueing when all are busy.
        """
        mode = self.settings.batching
        if mode == "on" or (mode == "auto" and shape.batch_size > 1):
            return None
        if not self._sequential.acquire(blocking=mode == "off"):
            return None
        slot = ExitStack()
        slot.callback(self._sequential.release)
        return slot

    def _windowed(self, job: Job) -> bool:
        """Whether a request that holds a sequential slot is decoded window by window, as the
        scheduler does (in its own thread, a batch of one), rather than by faster-whisper's
        ``transcribe``.

        With batching on or ``auto`` it always is: a request then gets the same text whether it
        ran alone or shared a batch, since both run one procedure. With batching off, only
        requests for token log-probabilities are, since only that procedure scores tokens.
        """
        return self.settings.batching != "off" or job.logprobs

    def _note(self, degraded: dict[str, str], plan: Plan, job: Job) -> None:
        """Record each kind of degradation once per request, and log it once."""
        for d in plan.degradations:
            if d.kind not in degraded:
                degraded[d.kind] = d.reason
                self.stats.degradations[d.kind] += 1
                logger.warning("request %s degraded (%s): %s", job.request_id, d.kind, d.reason)

    @contextmanager
    def _counted(self, gauge: Literal["running", "waiting_for_memory"]) -> Iterator[None]:
        """Count a request in one of the stats' gauges while the block runs."""
        with self._counting:
            setattr(self.stats, gauge, getattr(self.stats, gauge) + 1)
        try:
            yield
        finally:
            with self._counting:
                setattr(self.stats, gauge, getattr(self.stats, gauge) - 1)

    def _finish(self, request_id: str, outcome: str) -> None:
        """Write how the request ended on its recent decisions that have no outcome yet:
        ``ok``, the error's code, or ``replanned`` for a plan dropped before it ran (made
        before the audio's length was known)."""
        for decision in list(self.stats.recent):  # a copy: other threads append meanwhile
            if decision["request_id"] == request_id and decision["outcome"] is None:
                decision["outcome"] = outcome

    # ---- the two paths --------------------------------------------------------------------

    def _run_sequential(
        self,
        model: LoadedModel,
        job: Job,
        plan: Plan,
        audio: np.ndarray,
        language: str | None,
        prompt: str | list[int] | None,
        *,
        offset: float,
        first_id: int,
        cancelled: threading.Event | None,
    ) -> Iterator[tuple[Segment, str]]:
        heard = loud_for_vad(audio)  # what Silero VAD listens to (runners.loud_for_vad)
        if len(audio) < _MIN_PIECE_SAMPLES or not has_speech(heard, _SPEECH_GATE):
            # Nothing the VAD hears as speech: Whisper would only fail its fallback tests at
            # every temperature over it, at many times the cost of speech, and at best return
            # nothing (at worst a hallucinated "you"). The scheduler's windows are cut at speech
            # already, so this matters for the sequential path only.
            logger.debug(
                "request %s: no speech in %.2f s; skipped", job.request_id, len(audio) / SAMPLE_RATE
            )
            return
        options = job.transcribe_options(plan.shape, language=language, prompt=prompt)
        if not options["vad_filter"] and len(audio) > _SPARSE_CHECK_SAMPLES:
            gated = speech_timestamps(heard, _SPEECH_GATE)
            share = sum(s["end"] - s["start"] for s in gated) / len(audio)
            if share < _SPARSE_SPEECH:
                # Mostly pauses (a meeting, a recording left running): Whisper would decode
                # every silent window, many of them at every temperature. Decode the speech
                # only, with faster-whisper's own VAD filter.
                options["vad_filter"] = True
                logger.debug(
                    "request %s: %.0f%% speech in %.0f s; VAD filter on",
                    job.request_id,
                    100 * share,
                    len(audio) / SAMPLE_RATE,
                )
        del heard  # the louder copy is the VAD's only: not held while the model runs
        # Word edges are fitted to the speech, as on the windowed path (server.whisper.word_timing).
        spans = speech_spans(audio) if options["word_timestamps"] else []
        previous_end: float | None = None
        raw, detected = model.runner.transcribe(audio, options)
        for n, s in enumerate(raw):
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelledError("The client closed the request.")
            if spans and s.words:
                (s,) = fit_segments([s], spans, previous_end=previous_end)
                previous_end = s.words[-1].end
            yield to_segment(s, offset, first_id + n), detected

    def _run_windowed(
        self,
        model: LoadedModel,
        job: Job,
        plan: Plan,
        audio: np.ndarray,
        language: str | None,
        prompt: str | list[int] | None,
        *,
        offset: float,
        first_id: int,
        cancelled: threading.Event | None,
        queued: bool,
    ) -> Iterator[tuple[Segment, str]]:
        """Window by window: queued for the scheduler's shared batches, or decoded here, alone
        (``queued=False``, a caller holding a sequential slot). The text before the piece is
        not a prompt: windows are decoded in parallel."""
        if len(audio) < _MIN_PIECE_SAMPLES:
            return
        options = job.window_options(plan.shape, language=language)
        scheduler = self._scheduler(model)
        try:
            ticket = (scheduler.submit if queued else scheduler.decode)(
                audio, options, cancelled=cancelled
            )
            try:
                for n, s in enumerate(ticket):
                    yield to_segment(s, offset, first_id + n), ticket.language or "en"
            finally:
                if not ticket.done:  # stopped early (an error, the caller gone): drop the rest
                    ticket.withdraw()
        except QueueFullError as exc:
            raise RateLimitError(
                f"The batch queue is full ({exc}); retry after the delay in Retry-After.",
                retry_after=self.settings.retry_after,
            ) from exc
        except BatchFailedError as exc:
            if isinstance(exc.__cause__, APIError):
                raise exc.__cause__ from exc
            raise

    # ---- the scheduler's hooks ------------------------------------------------------------

    def _scheduler(self, model: LoadedModel) -> Scheduler:
        with self._scheduler_lock:
            scheduler = self._schedulers.get(id(model))
            if scheduler is None:
                scheduler = Scheduler(
                    model.runner,
                    max_batch=lambda key: self._max_batch(model, key),
                    max_wait_s=self.settings.batch_max_wait_ms / 1000,
                    max_queued_windows=self.settings.max_queue * 64,
                    around_batch=lambda key, size: self._around_batch(model, key, size),
                )
                self._schedulers[id(model)] = scheduler
            return scheduler

    def _max_batch(self, model: LoadedModel, key: BatchKey) -> int:
        """The planner's batch size for the scheduler's next batch, and its reservation.

        The requests waiting in the scheduler have each reserved a window's working memory
        under the batched key; a batch spends those (one batch runs at a time per model), so it
        is planned against the memory left once everything else is counted, and reserves until
        it ends only what it needs beyond them (:meth:`_around_batch` sizes that reservation to
        the batch actually taken, and releases it). Until then it reserves for the windows
        ready now, not for the largest batch: a piece of a sparse recording may hold one window
        of speech, and other work must not be refused for the seven that never come. Only the
        batch step applies here, then a bounded wait or a 503: the other degradations were
        decided when each request was planned.
        """
        steps = tuple(
            s for s in self.settings.degrade_ladder if s in (Step.BATCH, Step.WAIT, Step.REJECT)
        )
        shape = key.memory_shape(device_kind(model.device), model.compute_type, self.batch_size)
        ready = self._scheduler(model).ready(key)

        def reserve(plan: Plan) -> None:
            size = max(1, min(plan.shape.batch_size, ready))
            stale = self._batch_reservations.pop(id(model), None)
            self._batch_reservations[id(model)] = self.reservations.reserve(
                model.device, self._beyond_queued(model, key, size), "batch"
            )
            if stale is not None:  # never, as long as the scheduler pairs the two calls
                logger.error("a batch's reservation was never closed: %r; released it", stale)
                stale.release()

        plan, _ = self._decide(
            model,
            # The requests hold their pieces' host memory: the batch plans its working memory.
            PlanRequest(shape=shape, audio_seconds=30.0, host_held=True),
            steps or (Step.REJECT,),
            reserved_keys=(model.device,),
            cpu_load_bytes=0,
            on_run=reserve,
        )
        if plan.action == "reject":
            self.stats.rejected += 1
            raise InsufficientMemoryError(
                f"Not enough memory for a batch ({plan.reason}); retry later.",
                retry_after=plan.retry_after or self.settings.retry_after,
            )
        return plan.shape.batch_size

    def _beyond_queued(self, model: LoadedModel, key: BatchKey, size: int) -> int:
        """What a batch of ``size`` windows needs beyond the working memory its requests hold."""
        needs = model.cost.estimate(
            key.memory_shape(device_kind(model.device), model.compute_type, size)
        )
        queued = self.reservations.total(batched_key(model.device))
        return max(0, needs.device_bytes - queued)

    @contextmanager
    def _around_batch(self, model: LoadedModel, key: BatchKey, size: int) -> Iterator[None]:
        """Runs around every batch :meth:`_max_batch` planned: sizes the batch's reservation
        to the windows taken (at most the planner's batch), releases it when the batch ends,
        and an out-of-memory error raises the batch shape's estimate. A batch that found no
        window left to take (``size`` 0: its requests were cancelled meanwhile, or the
        scheduler closed) only gives back what was reserved for it."""
        planned = self._batch_reservations.pop(id(model), None)
        with ExitStack() as held:
            if planned is not None:
                held.enter_context(planned)
            if size == 0:
                yield
                return
            held.enter_context(
                self.reservations.reserve(
                    model.device, self._beyond_queued(model, key, size), "batch"
                )
            )
            if planned is not None:
                planned.release()  # resized to the batch taken (the new one is held first)
            try:
                yield
            except Exception as exc:
                if is_out_of_memory(exc):
                    shape = key.memory_shape(device_kind(model.device), model.compute_type, size)
                    model.cost = model.cost.with_correction(shape, 1.5)
                raise

    # ---- reporting ------------------------------------------------------------------------

    def model_status(self, model: LoadedModel) -> dict[str, Any]:
        """One loaded model: where, how big, whether in use, and when it would be unloaded."""
        ttl = self.settings.model_ttl
        idle = 0.0 if model.in_use else time.monotonic() - model.last_used
        unloads_in = None
        if not model.pinned and not model.in_use and ttl >= 0:
            unloads_in = round(max(0.0, ttl - idle), 1)
        return {
            "id": model.source.id,
            "device": model.device,
            "compute_type": model.compute_type,
            "weights_bytes": model.weights_bytes,
            "cost_source": "profile" if model.cost.profile is not None else "model",
            "loaded_at": int(model.loaded_at),
            "in_use": model.in_use,
            "pinned": model.pinned,
            "idle_s": round(idle, 1),
            "unloads_in_s": unloads_in,
        }

    def memory_report(self, in_flight: int = 0) -> dict[str, Any]:
        """Devices, resident models, reservations and recent decisions (GET /v1/memory).

        Args:
            in_flight: Requests admitted now (the admission queue's depth, which is the
                serving side's).
        """
        devices: list[dict[str, Any]] = []
        for device in dict.fromkeys([*self.places, "cpu"]):
            try:
                snap = self.probe(device).snapshot()
            except Exception as exc:  # a probe must never take the endpoint down
                devices.append({"device": device, "error": str(exc)})
                continue
            d = snap.device
            reserved = self.reserved_bytes(device)
            resident = self.pool.resident_bytes(device)
            # What this process is known to hold there: on the host its resident memory (which
            # contains its models); on a GPU its weights and what its requests reserved (NVML
            # cannot attribute memory to a process inside a container).
            ours = self.footprint() if device == "cpu" else resident + reserved
            devices.append(
                {
                    "device": device,
                    "index": d.index,
                    "name": d.name,
                    "uuid": d.uuid,
                    "total_bytes": d.total,
                    "free_bytes": d.free,
                    "used_bytes": d.used,
                    "reserved_bytes": reserved,
                    "resident_bytes": resident,
                    "others_bytes": max(0, d.used - ours),
                }
            )
        s = self.settings
        return {
            "device": self.device,
            "places": self.places,
            "device_reason": self.device_reason,
            "devices": devices,
            "requests": {
                "in_flight": in_flight,
                "max_queue": s.max_queue,
                "running": self.stats.running,
                "waiting_for_memory": self.stats.waiting_for_memory,
                "queued_windows": sum(st.queued_windows for st in self.scheduler_stats()),
            },
            "models": [self.model_status(m) for m in self.pool.loaded()],
            "model_ttl_s": s.model_ttl,
            "reservations": self.reservations.snapshot(),
            "idle_host_bytes": self.idle_host_bytes,
            "policy": {
                "mode": s.memory_policy,
                "ladder": [str(step) for step in s.degrade_ladder],
                "gpu_memory_limit": str(s.gpu_memory_limit) if s.gpu_memory_limit else None,
                "gpu_headroom": str(s.gpu_headroom),
                "host_memory_limit": str(s.host_memory_limit) if s.host_memory_limit else None,
                "host_headroom": str(s.host_headroom),
                "max_wait_s": s.max_memory_wait,
                "cpu_fallback": s.cpu_fallback,
            },
            "counters": {
                "degradations": dict(self.stats.degradations),
                "oom_recoveries": self.stats.oom_recoveries,
                "unloads": self.stats.unloads,
                "rejected": self.stats.rejected,
                "waits": self.stats.waits,
            },
            "recent_decisions": list(self.stats.recent),
        }


@dataclass
class _Progress:
    """How far one request has got: its segments, language, the prompt for the next piece
    and the degradations so far."""

    language: str | None
    prompt: str | list[int] | None
    on_decoded: Callable[[], None] | None = None
    segments: list[Segment] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)
    pieces: int = 0
    #: Model copies on other GPUs that pieces moved to, held until the request ends.
    models: ExitStack = field(default_factory=ExitStack)
    diarizer: Diarizer | None = None
    channel: int | None = None  # the channel being transcribed, when channels are speakers
    channels: list[int] = field(default_factory=list)  # each segment's channel
    streamed: int = 0  # diarized segments sent so far


def batched_key(device: str) -> str:
    """Reservation key of requests waiting in the scheduler on ``device``."""
    return f"{device}/batched"


def _process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _context(segments: list[Segment]) -> list[int]:
    """The tokens that condition the next window, as sequential decoding keeps them: the
    recent segments' tokens with their timestamp tokens (Whisper keeps the last 223)."""
    tokens: list[int] = []
    for segment in segments[-16:]:
        tokens.extend(segment.tokens)
    return tokens[-223:]


__all__ = ["Engine", "EngineStats"]
