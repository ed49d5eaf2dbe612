"""The engine's façade: start, close, ready, run.

The engine picks the device, loads the served model and runs requests. What it does is done
by its rooms, each handed the objects it needs when the engine is built:

- the memory gate (:mod:`server.memory.gate`): every reading, plan and reservation;
- model residency (:mod:`server.engine.residency`): models loaded, held, unloaded, their
  schedulers and the speaker encoder;
- the request planner (:mod:`server.engine.planning`): a request's shape, its pieces planned;
- placement (:mod:`server.engine.placement`): which GPU, with several;
- the piece pipeline (:mod:`server.engine.pipeline`) and its decode backends
  (:mod:`server.engine.backends`): a request, one piece at a time;
- the report (:mod:`server.engine.report`): counters, decisions, ``GET /v1/memory``.

All of it is blocking code run in worker threads; the serving layer calls :meth:`Engine.run`
from the event loop through :attr:`Engine.executor`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.config import Settings
from server.diarization import SpeakerEncoder
from server.engine.pipeline import OnSegment, PiecePipeline
from server.engine.placement import Placement
from server.engine.planning import RequestPlanner
from server.engine.pool import LoadedModel, ModelPool
from server.engine.report import Decisions, EngineStats, memory_report, model_status
from server.engine.residency import Residency
from server.engine.store import ModelSource, ModelStore
from server.errors import ModelNotReadyError
from server.memory import Budget, Plan, Reservation, Reservations, cuda_available
from server.memory.gate import MemoryGate
from server.memory.host_heap import release_freed_memory
from server.request import Job
from server.transcript import Transcript

logger = logging.getLogger(__name__)


class Engine:
    """Runs jobs: plans them against live memory readings and executes the plans.

    Args:
        settings: The server's settings.
        store: Resolves model names (by default, from the settings).
    """

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store or ModelStore.from_settings(settings)
        self.reservations = Reservations()
        self.gate = MemoryGate(settings, self.reservations)
        self.models = Residency(settings, self.gate)
        self.gate.residents = self.models
        self.stats = EngineStats(gate=self.gate.stats, unloaded=lambda: self.models.unloads)
        self.decisions = Decisions(self.stats)
        self.planner = RequestPlanner(settings, self.gate, self.models.pool, self.decisions)
        self.placement = Placement(self.gate, self.models.pool, self.planner)
        self.pipeline = PiecePipeline(
            settings,
            self.gate,
            self.models,
            self.planner,
            self.placement,
            self.decisions,
            self.stats,
        )
        self.device = "cpu"  # the kind: cuda or cpu
        self.device_reason = "not started"
        self.served: ModelSource | None = None
        self.load_error: str | None = None
        self.started_at = time.time()
        self._started = False
        # Threads mostly wait (on the scheduler or the sequential slots), so there is one per
        # admitted request; the model work itself is bounded by the slots and the scheduler.
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_queue, thread_name_prefix="whisper"
        )

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
        self._use_device("cuda" if ok else "cpu", reason)
        try:
            self.served = self.models.served = self.store.default_source()
            self._load_served()
        except ModelNotReadyError as exc:
            self.load_error = exc.message
            logger.error("model not ready: %s", exc.message)
        release_freed_memory()  # loading parses files and converts weights; keep none of that
        self.gate.settle()
        self.gate.plans_loads = self._started = True
        self.models.start_reaper()

    def _use_device(self, kind: str, reason: str) -> None:
        self.device, self.device_reason = kind, reason
        on_gpu = kind == "cuda"
        self.placement.places = (
            [f"cuda:{i}" for i in self.settings.device_index] if on_gpu else ["cpu"]
        )
        self.gate.cuda = on_gpu
        largest = self.settings.batch_size or (8 if on_gpu else 4)
        self.planner.largest_batch = self.models.largest_batch = largest

    def _load_served(self) -> None:
        """Load the served model on the chosen device. On CUDA, one window must also run there
        (counting devices and loading cuBLAS do not prove a kernel runs: a wrong cuBLAS, a driver
        too old for the wheel's PTX); if it does not, ``auto`` falls back to the CPU and says
        why in ``device_reason``, and ``cuda`` fails the start.

        Raises:
            ModelNotReadyError: the model cannot be loaded.
        """
        served = self.served
        assert served is not None
        if self.device == "cuda":
            first = self.places[0]
            try:
                self.models.load_pinned(served, first).runner.run_one_window()
                logger.info("device: cuda (%s; a test window ran on it)", self.device_reason)
                return
            except ModelNotReadyError as exc:
                if exc.__cause__ is None:  # not in the store: no device would help
                    raise
                failure = exc.message
            except Exception as exc:  # CTranslate2 raises RuntimeError, ValueError, ...
                failure = f"a test window failed on CUDA: {exc}"
            self.pool.discard(served, first)
            if self.settings.device == "cuda":
                raise ModelNotReadyError(f"WHISPER_DEVICE=cuda but {failure}")
            self._use_device("cpu", f"{self.device_reason}, but {failure}; running on the CPU")
            logger.warning("device: cpu (%s)", self.device_reason)
        else:
            logger.info("device: %s (%s)", self.device, self.device_reason)
        self.models.load_pinned(served, self.places[0])

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
        """Let running work finish, then stop the schedulers and the TTL reaper."""
        self._executor.shutdown(wait=True, cancel_futures=False)
        self.models.close()

    # ---- running --------------------------------------------------------------------------

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The worker threads :meth:`run` is called in (one per admitted request)."""
        return self._executor

    def run(
        self,
        job: Job,
        *,
        on_segment: OnSegment | None = None,
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
        place = self.placement.place_for(job)
        with self.models.use_model(job.source, place) as model:
            return self.pipeline.run(model, job, on_segment, cancelled, on_decoded)

    def check(self, job: Job, seconds: float) -> Plan | None:
        """What the planner would decide now for ``seconds`` of ``job``'s audio, reserving
        nothing and not waiting: a check before work that is planned again when it runs (a
        realtime session when it opens).

        Returns:
            The plan (``run``, ``wait`` or ``reject``); None when there is nothing to check
            yet: the model is not loaded here (loading is planned on its own), or a rejection
            that unloading an idle model could turn around (the work itself tries that).
        """
        model = self.pool.find(job.source, self.placement.place_for(job, seconds))
        return None if model is None else self.planner.check(model, job, seconds)

    # ---- models ---------------------------------------------------------------------------

    @property
    def pool(self) -> ModelPool:
        """The loaded models."""
        return self.models.pool

    @property
    def places(self) -> list[str]:
        """Where models run: the GPUs of WHISPER_DEVICE_INDEX (``cuda:0``, ...) or ``cpu``."""
        return self.placement.places

    def load(self, source: ModelSource) -> LoadedModel:
        """Load ``source`` on the serving device now (``POST /v1/models/{id}``); see
        :meth:`Residency.load`."""
        return self.models.load(source, self.places[0])

    def unload_source(self, source: ModelSource) -> list[LoadedModel]:
        """Unload every copy of ``source`` (``DELETE /v1/models/{id}``); see
        :meth:`Residency.unload_source`."""
        return self.models.unload_source(source)

    def speaker_encoder(self) -> SpeakerEncoder:
        """The speaker encoder for diarization; see :meth:`Residency.speaker_encoder`."""
        return self.models.speaker_encoder()

    # ---- memory held outside plans --------------------------------------------------------

    def hold_upload(self, nbytes: int, owner: str, api_key: str | None = None) -> Reservation:
        """Count an upload held in memory against host RAM; see :meth:`MemoryGate.hold`."""
        return self.gate.hold(nbytes, owner, api_key)

    def settle(self) -> None:
        """Read what the process holds with nothing running; see :meth:`MemoryGate.settle`."""
        self.gate.settle()

    def release_leftovers(self, owner: str) -> None:
        """Release what an ended request still holds; see
        :meth:`MemoryGate.release_leftovers`."""
        self.gate.release_leftovers(owner)

    def free_budget(self, place: str) -> Budget:
        """What new work may use on ``place`` now; see :meth:`MemoryGate.free_budget`."""
        return self.gate.free_budget(place)

    @property
    def footprint(self) -> Callable[[], int]:
        """Reads what this process holds on the host outside any reservation (see
        :attr:`MemoryGate.footprint`); the app adds its decoder processes to it."""
        return self.gate.footprint

    @footprint.setter
    def footprint(self, read: Callable[[], int]) -> None:
        self.gate.footprint = read

    # ---- reporting ------------------------------------------------------------------------

    def model_status(self, model: LoadedModel) -> dict[str, Any]:
        """One loaded model, as ``/v1/models`` and ``/v1/memory`` show it."""
        return model_status(model, self.settings.model_ttl)

    def memory_report(self, in_flight: int = 0) -> dict[str, Any]:
        """Devices, resident models, reservations and recent decisions (GET /v1/memory).

        Args:
            in_flight: Requests admitted now (the admission queue's depth, which is the
                serving side's).
        """
        return memory_report(self, in_flight)


__all__ = ["Engine"]
