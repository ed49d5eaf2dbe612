"""The engine: a pool of loaded models and the code that runs a planned request with
faster-whisper.

One request goes: audio is cut into pieces that fit host RAM (at pauses) -> for every piece the
planner reads the memory probe and returns a Plan -> the piece runs under a memory reservation
-> an out-of-memory error raises the cost estimate for that shape, steps the plan down one rung
and resumes from the last finished segment. All of this is blocking code run in worker threads;
the routes call it through :meth:`Engine.run` from the event loop.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from server.audio import split_on_silence
from server.config import Settings
from server.errors import (
    APIError,
    InsufficientMemoryError,
    ModelNotReadyError,
    RateLimitError,
    RequestCancelledError,
)
from server.memory import (
    CostModel,
    MemoryProbe,
    Plan,
    PlanRequest,
    Policy,
    Profile,
    Reservations,
    Shape,
    Step,
    cuda_available,
    format_bytes,
    open_probe,
    plan_request,
    read_model_dims,
)
from server.model_store import ModelSource, ModelStore
from server.scheduler import (
    TEMPERATURES,
    BatchFailedError,
    BatchKey,
    QueueFullError,
    Scheduler,
    SchedulerStats,
    WindowOptions,
)
from server.scheduler import RequestCancelledError as SchedulerCancelledError
from server.transcript import Segment, Transcript, Word

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOST = "host"  # reservation key for request buffers in host RAM


def batched_key(device: str) -> str:
    """Reservation key of requests waiting in the scheduler on ``device``."""
    return f"{device}/batched"


PROFILE_FILE = "memory_profile.json"
# CTranslate2 reports device OOM as "CUDA failed with error out of memory" (or a cuBLAS
# allocation failure); host OOM surfaces as std::bad_alloc or MemoryError.
_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|bad_alloc|failed to allocate", re.I)
_MAX_OOM_RETRIES = 4


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception raised by CTranslate2 means the device ran out of memory."""
    if isinstance(exc, BatchFailedError) and exc.__cause__ is not None:
        return is_out_of_memory(exc.__cause__)
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and _OOM.search(str(exc)) is not None
    )


@dataclass(frozen=True)
class Job:
    """One transcription or translation, with the audio already decoded.

    Attributes:
        audio: 16 kHz mono float32 samples.
        source: The model to run.
        word_timestamps: Whether the client asked for word granularity.
        temperature: 0 means faster-whisper's fallback schedule (as OpenAI does); above 0 a
            single sampling temperature.
    """

    request_id: str
    audio: np.ndarray
    source: ModelSource
    task: str = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    beam_size: int = 5
    word_timestamps: bool = False
    vad_filter: bool = False
    vad_parameters: dict[str, Any] | None = None
    hotwords: str | None = None

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class LoadedModel:
    """A faster-whisper model resident on one device, with its cost model."""

    source: ModelSource
    device: str
    compute_type: str
    whisper: Any  # faster_whisper.WhisperModel
    cost: CostModel
    weights_bytes: int
    loaded_at: float = field(default_factory=time.time)
    leases: int = 0

    @property
    def multilingual(self) -> bool:
        return bool(self.whisper.model.is_multilingual)


class ModelPool:
    """Loads models on first use and keeps them; one lock per (model, device)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def loaded(self) -> list[LoadedModel]:
        with self._guard:
            return list(self._models.values())

    def get(self, source: ModelSource, device: str) -> LoadedModel:
        """The model ``source`` on ``device``, loading it if needed.

        Raises:
            ModelNotReadyError: the model cannot be loaded.
        """
        key = (source.load_target, device)
        with self._guard:
            if key in self._models:
                return self._models[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._models:
                    return self._models[key]
            model = self._load(source, device)
            with self._guard:
                self._models[key] = model
            return model

    def _download(self, source: ModelSource) -> Path:
        """Fetch a Hugging Face model into the store (only with WHISPER_ALLOW_DOWNLOADS)."""
        from faster_whisper.utils import download_model

        if not self._settings.allow_downloads:
            raise ModelNotReadyError(
                f"Model {source.id!r} is not in {self._settings.models_dir}; set "
                "WHISPER_ALLOW_DOWNLOADS=true to download it from Hugging Face."
            )
        target = self._settings.models_dir / str(source.repo).replace("/", "--")
        return Path(download_model(str(source.repo), output_dir=str(target)))

    def _load(self, source: ModelSource, device: str) -> LoadedModel:
        from faster_whisper import WhisperModel

        settings = self._settings
        compute_type = settings.compute_type
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        started = time.perf_counter()
        try:
            folder = source.path or self._download(source)
            whisper = WhisperModel(
                str(folder),
                device=device,
                device_index=settings.device_index,
                compute_type=compute_type,
                cpu_threads=settings.cpu_threads,
                num_workers=settings.max_concurrency,
                local_files_only=True,
            )
        except ModelNotReadyError:
            raise
        except Exception as exc:  # CTranslate2 and huggingface_hub raise many kinds
            raise ModelNotReadyError(
                f"Model {source.id!r} could not be loaded on {device}: {exc}"
            ) from exc
        dims = read_model_dims(folder)
        profile = Profile.load(folder / PROFILE_FILE)
        if profile is not None and not profile.matches(device=device, compute_type=compute_type):
            profile = None
        cost = CostModel(dims, profile=profile)
        weights = cost.weights_bytes(compute_type)
        logger.info(
            "loaded model %s on %s (%s) in %.1fs; weights about %s%s",
            source.id,
            device,
            compute_type,
            time.perf_counter() - started,
            format_bytes(weights),
            "; using measured memory profile" if profile is not None else "",
        )
        return LoadedModel(source, device, compute_type, whisper, cost, weights)


@dataclass
class EngineStats:
    """Counters and recent decisions, for /v1/memory and /metrics."""

    degradations: Counter[str] = field(default_factory=Counter)
    oom_recoveries: int = 0
    rejected: int = 0
    waits: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))


class Engine:
    """Runs jobs: plans them against live memory readings and executes the plans.

    Args:
        settings: The server's settings.
        store: Resolves model names (by default, from the settings).
    """

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store or ModelStore.from_settings(settings)
        self.pool = ModelPool(settings)
        self.reservations = Reservations()
        self.stats = EngineStats()
        self.device = "cpu"
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
        self._admitted = 0
        self._per_key: Counter[str] = Counter()
        self._admit_lock = threading.Lock()
        self.on_plan: Callable[[Plan], None] | None = None  # metrics hook
        self._fault_calls = 0
        self._fault_lock = threading.Lock()

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
        self.device_reason = reason
        logger.info("device: %s (%s)", self.device, reason)
        try:
            self.served = self.store.default_source()
            self.pool.get(self.served, self.device)
        except ModelNotReadyError as exc:
            self.load_error = exc.message
            logger.error("model not ready: %s", exc.message)

    @property
    def ready(self) -> bool:
        return self.served is not None and self.load_error is None and bool(self.pool.loaded())

    def close(self) -> None:
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

    # ---- admission ------------------------------------------------------------------------

    @contextmanager
    def admit(self, key: str | None = None) -> Iterator[None]:
        """Hold one of WHISPER_MAX_QUEUE slots for a request (and, with API keys, one of the
        key's WHISPER_MAX_REQUESTS_PER_KEY), or refuse it with 429."""
        per_key = self.settings.max_requests_per_key
        with self._admit_lock:
            if self._admitted >= self.settings.max_queue:
                raise RateLimitError(
                    f"The server is busy ({self._admitted} requests queued or running); "
                    "retry after the delay in Retry-After.",
                    retry_after=self.settings.retry_after,
                )
            if key is not None and per_key and self._per_key[key] >= per_key:
                raise RateLimitError(
                    f"This API key already has {per_key} requests in flight "
                    "(WHISPER_MAX_REQUESTS_PER_KEY); retry after the delay in Retry-After.",
                    retry_after=self.settings.retry_after,
                    code="key_concurrency_limit",
                )
            self._admitted += 1
            if key is not None:
                self._per_key[key] += 1
        try:
            yield
        finally:
            with self._admit_lock:
                self._admitted -= 1
                if key is not None:
                    self._per_key[key] -= 1

    def reserved_bytes(self, device: str) -> int:
        """Memory reserved on ``device`` now: by sequential requests and by requests waiting
        in the scheduler."""
        return self.reservations.total(device) + self.reservations.total(batched_key(device))

    @property
    def queue_depth(self) -> int:
        return self._admitted

    # ---- memory ---------------------------------------------------------------------------

    def probe(self, device: str) -> MemoryProbe:
        if device not in self._probes:
            self._probes[device] = open_probe(device, self.settings.device_index)
        return self._probes[device]

    def policy(self, resident_bytes: int) -> Policy:
        s = self.settings
        return Policy(
            mode=s.memory_policy,
            ladder=tuple(Step(step) for step in s.degrade_ladder),
            device_limit=s.gpu_memory_limit,
            device_headroom=s.gpu_headroom,
            host_limit=s.host_memory_limit,
            host_headroom=s.host_headroom,
            max_wait=s.max_memory_wait,
            cpu_fallback=s.cpu_fallback and self.device == "cuda",
            retry_after=s.retry_after,
            resident_bytes=resident_bytes,
        )

    def requested_shape(self, model: LoadedModel, job: Job) -> Shape:
        """The shape the client's options ask for, before any planning."""
        windows = math.ceil(job.duration / self.settings.chunk_length)
        # Long files decode their own windows in batches; short ones run sequentially so that
        # each window is conditioned on the text before it, exactly as faster-whisper does.
        mode = self.settings.batching
        batch = 1
        if mode == "on" or (mode == "auto" and windows > 2):
            batch = min(self.settings.batch_size, windows)
        hypotheses = job.beam_size if job.temperature == 0 else max(job.beam_size, 5)
        return Shape(
            device=model.device,
            compute_type=model.compute_type,
            batch_size=max(1, batch),
            beam_size=hypotheses,
            word_timestamps=job.word_timestamps,
            chunk_length=self.settings.chunk_length,
        )

    def _plan(
        self,
        model: LoadedModel,
        shape: Shape,
        audio_seconds: float,
        job: Job,
        *,
        scheduled: bool = False,
        survey: bool = False,
    ) -> tuple[Plan, ExitStack]:
        """Plan one piece and reserve what the plan needs, as one step under the ledger's lock
        (so two requests never spend the same free memory); wait, bounded, while the planner
        says memory may free up.

        A request headed for the scheduler reserves its working memory under the batched key
        (the batches its windows join spend it), and skips the ``chunk`` step: batched windows
        are padded to 30 s, so shorter ones would save nothing.

        A ``survey`` plan covers the whole request only to size its host pieces; each piece is
        planned again, so a survey is left out of the decision log and the metrics unless it
        rejects the request.

        Returns:
            The plan and the reservations to release when the piece is done.

        Raises:
            InsufficientMemoryError: the planner rejected the request.
        """
        steps = tuple(
            Step(step)
            for step in self.settings.degrade_ladder
            if not (scheduled and step == "chunk")
        )
        cpu_copy = any(m.device == "cpu" and m.source == job.source for m in self.pool.loaded())
        held = ExitStack()

        def reserve(plan: Plan) -> None:
            key = batched_key(plan.device) if scheduled else plan.device
            held.enter_context(self.reservations.reserve(key, plan.reserve_bytes, job.request_id))
            held.enter_context(self.reservations.reserve(HOST, plan.host_bytes, job.request_id))

        plan, waited = self._decide(
            model,
            PlanRequest(shape=shape, audio_seconds=audio_seconds),
            steps,
            reserved_keys=(model.device, batched_key(model.device)),
            cpu_load_bytes=0 if cpu_copy or model.device == "cpu" else None,
            on_run=reserve,
        )
        if survey and plan.action != "reject":
            return plan, held
        self.stats.recent.append(
            {
                "request_id": job.request_id,
                "at": time.time(),
                "action": plan.action,
                "device": plan.device,
                "batch_size": plan.shape.batch_size,
                "beam_size": plan.shape.beam_size,
                "word_timestamps": plan.shape.word_timestamps,
                "chunk_length": plan.shape.chunk_length,
                "estimate_bytes": plan.estimate.device_bytes,
                "budget_bytes": plan.budget,
                "waited_s": round(waited, 3),
                "degradations": [d.kind for d in plan.degradations],
            }
        )
        if self.on_plan is not None:
            self.on_plan(plan)
        if plan.action == "reject":
            self.stats.rejected += 1
            reasons = "; ".join(d.reason for d in plan.degradations) or "no memory"
            raise InsufficientMemoryError(
                "Not enough memory to run this request now "
                f"({plan.reason or reasons}); retry after the delay in Retry-After.",
                retry_after=plan.retry_after or self.settings.retry_after,
            )
        return plan, held

    # ---- running --------------------------------------------------------------------------

    def run(
        self,
        job: Job,
        *,
        on_segment: Callable[[Segment], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> Transcript:
        """Transcribe ``job`` (blocking).

        Args:
            job: The decoded audio and the client's options.
            on_segment: Called with each segment as soon as it is final (streaming).
            cancelled: Set when the client has gone; the job stops at the next window.

        Returns:
            The transcript, with every change the planner made recorded in ``degradations``.

        Raises:
            ModelNotReadyError, InsufficientMemoryError (503), RateLimitError (the scheduler's
            queue is full), RequestCancelledError (the client went away).
        """
        if self.served is None or self.load_error is not None:
            raise ModelNotReadyError(
                f"The model is not loaded: {self.load_error or 'still starting'}.",
                retry_after=self.settings.retry_after,
            )
        model = self.pool.get(job.source, self.device)
        shape = self.requested_shape(model, job)
        degraded: dict[str, str] = {}
        first, held = self._plan(model, shape, job.duration, job, survey=True)
        held.close()  # each piece is planned and reserved again below

        spans = split_on_silence(job.audio, max_span_s=max(first.host_chunk_seconds, 30.0))
        if len(spans) > 1:
            logger.info(
                "request %s: %.0f s of audio in %d pieces of at most %.0f s (host memory)",
                job.request_id,
                job.duration,
                len(spans),
                first.host_chunk_seconds,
            )
        segments: list[Segment] = []
        language = job.language
        prompt: str | list[int] | None = job.prompt
        for span in spans:
            piece = job.audio[span.start : span.end]
            resume = 0  # samples of this piece already transcribed
            attempts = 0
            while True:
                if cancelled is not None and cancelled.is_set():
                    raise RequestCancelledError("The client closed the request.")
                # Every piece is planned against the memory free when it starts.
                slot = self._sequential_slot(shape)
                try:
                    plan, held = self._plan(
                        model,
                        shape,
                        (len(piece) - resume) / SAMPLE_RATE,
                        job,
                        scheduled=slot is None,
                    )
                except BaseException:
                    if slot is not None:
                        slot.close()
                    raise
                if slot is not None:
                    held.push(slot)
                run_piece = self._run_scheduled if slot is None else self._run_piece
                self._note(degraded, plan, job)
                runner = (
                    model if plan.device == model.device else self.pool.get(job.source, plan.device)
                )
                try:
                    with held:
                        produced = run_piece(
                            runner,
                            job,
                            plan,
                            piece[resume:],
                            language,
                            prompt,
                            offset=(span.start + resume) / SAMPLE_RATE,
                            first_id=len(segments),
                            cancelled=cancelled,
                        )
                        for segment, detected in produced:
                            language = language or detected
                            segments.append(segment)
                            if on_segment is not None:
                                on_segment(segment)
                            resume = min(len(piece), round(segment.end * SAMPLE_RATE) - span.start)
                    break
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
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
                        exc,
                        (span.start + resume) / SAMPLE_RATE,
                        shape,
                    )
                    degraded.setdefault(
                        "oom_retry", f"out of memory with {describe(failed)}; retried"
                    )
                    if segments and job.temperature == 0:
                        prompt = _context(segments)
                    if attempts > _MAX_OOM_RETRIES:
                        raise InsufficientMemoryError(
                            "The device ran out of memory repeatedly; retry later.",
                            retry_after=self.settings.retry_after,
                        ) from exc
            if segments and job.temperature == 0:
                # Carry the text across pieces, as sequential decoding does across windows.
                prompt = _context(segments)
        return Transcript(
            task=job.task,
            language=language or "en",
            duration=job.duration,
            segments=tuple(segments),
            degradations=tuple(degraded.items()),
        )

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

    def _scheduler(self, model: LoadedModel) -> Scheduler:
        with self._scheduler_lock:
            scheduler = self._schedulers.get(id(model))
            if scheduler is None:
                scheduler = Scheduler(
                    model.whisper,
                    max_batch=lambda key: self._max_batch(model, key),
                    max_wait_s=self.settings.batch_max_wait_ms / 1000,
                    max_queued_windows=self.settings.max_queue * 64,
                    around_batch=lambda key, size: self._around_batch(model, key, size),
                )
                self._schedulers[id(model)] = scheduler
            return scheduler

    def _batch_shape(self, model: LoadedModel, key: BatchKey, size: int) -> Shape:
        return Shape(
            device=model.device,
            compute_type=model.compute_type,
            batch_size=max(1, size),
            beam_size=key.hypotheses,
            word_timestamps=key.word_timestamps,
            chunk_length=30,  # batched windows are padded to 30 s
        )

    def _max_batch(self, model: LoadedModel, key: BatchKey) -> int:
        """The planner's batch size for the scheduler's next batch.

        The requests waiting in the scheduler have reserved their working memory under the
        batched key; a batch spends those reservations (one batch runs at a time per model),
        so it is planned against the memory left once everything else is counted. Only the
        batch step applies here, then a bounded wait or a 503: the other degradations were
        decided when each request was planned.
        """
        steps = tuple(
            Step(step)
            for step in self.settings.degrade_ladder
            if step in ("batch", "wait", "reject")
        )
        plan, _ = self._decide(
            model,
            PlanRequest(
                shape=self._batch_shape(model, key, self.settings.batch_size), audio_seconds=30.0
            ),
            steps or (Step.REJECT,),
            reserved_keys=(model.device,),
            cpu_load_bytes=0,
        )
        if plan.action == "reject":
            self.stats.rejected += 1
            raise InsufficientMemoryError(
                f"Not enough memory for a batch ({plan.reason}); retry later.",
                retry_after=plan.retry_after or self.settings.retry_after,
            )
        return plan.shape.batch_size

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
        while True:
            since = self.reservations.generation
            with self.reservations.admission():
                snapshot = self.probe(model.device).snapshot()
                resident = sum(
                    m.weights_bytes for m in self.pool.loaded() if m.device == model.device
                )
                plan = plan_request(
                    request,
                    snapshot,
                    replace(self.policy(resident), ladder=steps),
                    reserved=sum(self.reservations.total(k) for k in reserved_keys),
                    host_reserved=self.reservations.total(HOST),
                    cost=model.cost,
                    waited=waited,
                    cpu_load_bytes=cpu_load_bytes,
                )
                if plan.action == "run" and on_run is not None:
                    on_run(plan)
            if plan.action != "wait":
                return plan, waited
            self.stats.waits += 1
            started = time.monotonic()
            self.reservations.wait_for_release(timeout=min(plan.wait_s, 0.5), since=since)
            waited += time.monotonic() - started

    @contextmanager
    def _around_batch(self, model: LoadedModel, key: BatchKey, size: int) -> Iterator[None]:
        """Runs around every batch: the test fault hook, and a raised estimate after an OOM."""
        try:
            self._inject_fault()
            yield
        except Exception as exc:
            if is_out_of_memory(exc):
                shape = self._batch_shape(model, key, size)
                model.cost = model.cost.with_correction(shape, 1.5)
            raise

    def _run_scheduled(
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
        if len(audio) < SAMPLE_RATE // 100:
            return
        shape = plan.shape
        options = WindowOptions(
            language=language,
            task=job.task,
            initial_prompt=job.prompt,  # windows decode in parallel: no previous-text context
            hotwords=job.hotwords,
            beam_size=shape.beam_size if job.temperature == 0 else 1,
            best_of=min(5, shape.beam_size),
            temperatures=TEMPERATURES if job.temperature == 0 else (job.temperature,),
            word_timestamps=shape.word_timestamps,
            vad_filter=True,
            vad_parameters=job.vad_parameters,
            chunk_length=shape.chunk_length,
        )
        try:
            ticket = self._scheduler(model).submit(audio, options, cancelled=cancelled)
            for n, s in enumerate(ticket):
                yield self._segment(s, offset, first_id + n), ticket.language or "en"
        except QueueFullError as exc:
            raise RateLimitError(
                f"The batch queue is full ({exc}); retry after the delay in Retry-After.",
                retry_after=self.settings.retry_after,
            ) from exc
        except SchedulerCancelledError as exc:
            raise RequestCancelledError("The client closed the request.") from exc
        except BatchFailedError as exc:
            if isinstance(exc.__cause__, APIError):
                raise exc.__cause__ from exc
            raise

    def _note(self, degraded: dict[str, str], plan: Plan, job: Job) -> None:
        for d in plan.degradations:
            if d.kind not in degraded:
                degraded[d.kind] = d.reason
                self.stats.degradations[d.kind] += 1
                logger.warning("request %s degraded (%s): %s", job.request_id, d.kind, d.reason)

    def _inject_fault(self) -> None:
        """Test hook (WHISPER_FAULT_OOM_CALLS): fail the first N inference calls."""
        if self.settings.fault_oom_calls <= 0:
            return
        with self._fault_lock:
            if self._fault_calls >= self.settings.fault_oom_calls:
                return
            self._fault_calls += 1
        raise RuntimeError("CUDA failed with error out of memory")

    def _run_piece(
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
        if len(audio) < SAMPLE_RATE // 100:
            return
        self._inject_fault()
        shape = plan.shape
        options: dict[str, Any] = dict(
            language=language,
            task=job.task,
            beam_size=shape.beam_size if job.temperature == 0 else 1,
            best_of=min(5, shape.beam_size),
            temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0] if job.temperature == 0 else job.temperature,
            initial_prompt=prompt,
            word_timestamps=shape.word_timestamps,
            hotwords=job.hotwords,
            chunk_length=shape.chunk_length if shape.chunk_length != 30 else None,
        )
        raw, info = model.whisper.transcribe(
            audio, vad_filter=job.vad_filter, vad_parameters=job.vad_parameters, **options
        )
        for n, s in enumerate(raw):
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelledError("The client closed the request.")
            yield self._segment(s, offset, first_id + n), info.language

    @staticmethod
    def _segment(s: Any, offset: float, segment_id: int) -> Segment:
        """A faster-whisper segment as ours, with times from the start of the upload."""
        words = None
        if s.words is not None:
            words = tuple(
                Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), w.probability)
                for w in s.words
            )
        return Segment(
            id=segment_id,
            seek=int(s.seek + offset * 100),
            start=round(s.start + offset, 3),
            end=round(s.end + offset, 3),
            text=s.text,
            tokens=tuple(s.tokens),
            temperature=float(s.temperature or 0.0),
            avg_logprob=float(s.avg_logprob),
            compression_ratio=float(s.compression_ratio),
            no_speech_prob=float(s.no_speech_prob),
            words=words,
        )

    def memory_report(self) -> dict[str, Any]:
        """Devices, resident models, reservations and recent decisions (GET /v1/memory)."""
        devices: list[dict[str, Any]] = []
        for device in dict.fromkeys([self.device, "cpu"]):
            try:
                snap = self.probe(device).snapshot()
            except Exception as exc:  # a probe must never take the endpoint down
                devices.append({"device": device, "error": str(exc)})
                continue
            d = snap.device
            entry: dict[str, Any] = {
                "device": device,
                "index": d.index,
                "name": d.name,
                "uuid": d.uuid,
                "total_bytes": d.total,
                "free_bytes": d.free,
                "used_bytes": d.used,
                "reserved_bytes": self.reserved_bytes(device),
            }
            devices.append(entry)
        s = self.settings
        return {
            "device": self.device,
            "device_reason": self.device_reason,
            "devices": devices,
            "models": [
                {
                    "id": m.source.id,
                    "device": m.device,
                    "compute_type": m.compute_type,
                    "weights_bytes": m.weights_bytes,
                    "cost_source": "profile" if m.cost.profile is not None else "model",
                }
                for m in self.pool.loaded()
            ],
            "reservations": self.reservations.snapshot(),
            "policy": {
                "mode": s.memory_policy,
                "ladder": list(s.degrade_ladder),
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
                "rejected": self.stats.rejected,
                "waits": self.stats.waits,
            },
            "recent_decisions": list(self.stats.recent),
        }


def _context(segments: list[Segment]) -> list[int]:
    """The tokens that condition the next window, as sequential decoding keeps them: the
    recent segments' tokens with their timestamp tokens (Whisper keeps the last 223)."""
    tokens: list[int] = []
    for segment in segments[-16:]:
        tokens.extend(segment.tokens)
    return tokens[-223:]


def describe(shape: Shape) -> str:
    return (
        f"batch {shape.batch_size}, beam {shape.beam_size}, "
        f"{shape.chunk_length}s windows, word timestamps {'on' if shape.word_timestamps else 'off'}"
    )


def step_down(shape: Shape, ladder: tuple[str, ...]) -> Shape:
    """The shape one rung down the ladder from ``shape`` (after an out-of-memory error)."""
    for step in ladder:
        if step == "batch" and shape.batch_size > 1:
            return replace(shape, batch_size=max(1, shape.batch_size // 2))
        if step == "chunk" and shape.chunk_length > 10:
            return replace(shape, chunk_length=max(10, shape.chunk_length - 10))
        if step == "greedy" and shape.beam_size > 1:
            return replace(shape, beam_size=1)
        if step == "word_timestamps" and shape.word_timestamps:
            return replace(shape, word_timestamps=False)
    return shape


__all__ = [
    "Engine",
    "EngineStats",
    "Job",
    "LoadedModel",
    "ModelPool",
    "is_out_of_memory",
    "step_down",
]
