"""Model residency: which models this server holds, where, and for how long.

Models load on first use under the memory gate (:meth:`MemoryGate.room_for_load`), are held
by the requests using them (a held model is never unloaded), and go when they are idle: after
``WHISPER_MODEL_TTL``, when the gate needs their memory for other work, or when asked
(``DELETE /v1/models/{id}``). The served model may be pinned. Each loaded model has its own
cross-request scheduler, created on first use with a :class:`BatchBudget` (the gate, as the
scheduler asks it). The speaker encoder for diarization is loaded here too, once.

:class:`Residency` is what the gate sees as its ``Residents``: resident bytes per place, the
idle models, and unloading one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from server.batching.policy import SchedulingPolicy
from server.batching.scheduler import Scheduler, SchedulerStats
from server.config import Settings
from server.diarization import SpeakerEncoder, load_encoder
from server.engine.pool import LoadedModel, ModelPool
from server.engine.store import ModelSource, install_speaker_encoder
from server.errors import ConflictError, NotFoundError
from server.memory import format_bytes
from server.memory.batch_budget import BatchBudget
from server.memory.gate import MemoryGate, Resident
from server.memory.host_heap import release_freed_memory
from server.memory.probes import device_kind

logger = logging.getLogger(__name__)


class Residency:
    """The models held, and their schedulers (see the module doc).

    Args:
        settings: TTL, pinning, batching and queue settings.
        gate: Plans every load, and is told when a CPU model's memory is given back.
    """

    def __init__(self, settings: Settings, gate: MemoryGate) -> None:
        self.settings = settings
        self.gate = gate
        self.pool = ModelPool(settings, gate)
        #: The served model (pinned under WHISPER_PIN_DEFAULT_MODEL); set at start-up.
        self.served: ModelSource | None = None
        #: The largest batch a scheduler may run (WHISPER_BATCH_SIZE or the device's default).
        self.largest_batch = 4
        self.unloads = 0
        self._schedulers: dict[int, Scheduler] = {}
        self._scheduler_lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._speaker_encoder: SpeakerEncoder | None = None
        self._speaker_lock = threading.Lock()

    # ---- holding models -------------------------------------------------------------------

    @contextmanager
    def use_model(
        self, source: ModelSource, place: str, *, planned: bool = False
    ) -> Iterator[LoadedModel]:
        """Hold ``source`` on ``place`` for the block, loading it first if needed (planned
        like a request by the gate). A held model is never unloaded. ``planned``: the caller's
        plan already reserved room to load it (the CPU fallback's plan counts its CPU copy).

        Raises:
            ModelNotReadyError: it cannot be loaded.
            InsufficientMemoryError: there is no room to load it, even after unloading idle
                models and waiting (WHISPER_MAX_MEMORY_WAIT).
        """
        model = self.pool.checkout(source, place, pinned=self._pinned(source), planned=planned)
        try:
            yield model
        finally:
            self.pool.release(model)
            if model.unload_requested:
                self.unload(model, "unload requested")
            elif self.settings.model_ttl == 0:
                self.unload(model, "WHISPER_MODEL_TTL=0")

    def load(self, source: ModelSource, place: str) -> LoadedModel:
        """Load ``source`` on ``place`` now (``POST /v1/models/{id}``), planned like a
        request's load; its idle time starts now.

        Raises:
            ModelNotReadyError, InsufficientMemoryError: as :meth:`use_model`.
        """
        with self.use_model(source, place) as model:
            return model

    def load_pinned(self, source: ModelSource, place: str) -> LoadedModel:
        """Load the served model at start-up (not planned: nothing else runs yet)."""
        return self.pool.get(source, place, pinned=self._pinned(source))

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
        return (
            self.settings.pin_default_model
            and served is not None
            and source.load_target == served.load_target
        )

    # ---- what the gate asks (Residents) ---------------------------------------------------

    def resident_bytes(self, place: str) -> int:
        """Weights of every model loaded on ``place``."""
        return self.pool.resident_bytes(place)

    def idle(self, place: str, exclude: object = None) -> list[LoadedModel]:
        """Models on ``place`` that nothing holds and nothing pins, least recently used first."""
        keep = exclude if isinstance(exclude, LoadedModel) else None
        return self.pool.idle(place, exclude=keep)

    def unload(self, model: Resident, reason: str) -> bool:
        """Unload ``model`` now if nothing holds it and it is not pinned: its scheduler is
        closed, CTranslate2 frees its weights, and a CPU model's memory is given back.

        Returns:
            Whether it was unloaded.
        """
        assert isinstance(model, LoadedModel)
        if not self.pool.take_idle(model):
            return False
        with self._scheduler_lock:
            scheduler = self._schedulers.pop(id(model), None)
        if scheduler is not None:
            scheduler.close(timeout=30)
        model.runner.whisper.model.unload_model()
        if model.device == "cpu":
            self.gate.forget_host_bytes(model.weights_bytes)
        release_freed_memory()
        self.gate.settle()
        self.unloads += 1
        logger.info(
            "unloaded model %s from %s (%s of weights): %s",
            model.source.id,
            model.device,
            format_bytes(model.weights_bytes),
            reason,
        )
        return True

    # ---- schedulers -----------------------------------------------------------------------

    def scheduler(self, model: LoadedModel) -> Scheduler:
        """``model``'s cross-request scheduler (created on first use), whose batches ask a
        :class:`BatchBudget` for their memory."""
        with self._scheduler_lock:
            scheduler = self._schedulers.get(id(model))
            if scheduler is None:
                settings = self.settings
                budget = BatchBudget(
                    self.gate,
                    model,
                    largest=self.largest_batch,
                    ladder=settings.degrade_ladder,
                    retry_after=settings.retry_after,
                )
                scheduler = Scheduler(
                    model.runner,
                    budget=budget,
                    workers=settings.batch_workers_on(device_kind(model.device)),
                    max_wait_s=settings.batch_max_wait_ms / 1000,
                    max_queued_windows=settings.max_queue * 64,
                    policy=SchedulingPolicy(
                        starvation_s=settings.batch_starvation_s,
                        starvation_batches=settings.batch_starvation_batches,
                    ),
                )
                self._schedulers[id(model)] = scheduler
            return scheduler

    def scheduler_stats(self) -> list[SchedulerStats]:
        with self._scheduler_lock:
            return [s.stats() for s in self._schedulers.values()]

    # ---- the speaker encoder --------------------------------------------------------------

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

    # ---- lifecycle ------------------------------------------------------------------------

    def start_reaper(self) -> None:
        """Unload models idle for WHISPER_MODEL_TTL seconds from now on (when it is above 0)."""
        if self.settings.model_ttl > 0:
            self._reaper = threading.Thread(
                target=self._unload_expired, name="whisper-model-ttl", daemon=True
            )
            self._reaper.start()

    def close(self) -> None:
        """Stop the reaper and close every scheduler (their running batches finish first)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=10)
        with self._scheduler_lock:
            for scheduler in self._schedulers.values():
                scheduler.close(timeout=30)
            self._schedulers.clear()

    def _unload_expired(self) -> None:
        ttl = self.settings.model_ttl
        while not self._stop.wait(min(max(ttl / 4, 0.2), 10.0)):
            now = time.monotonic()
            for model in self.pool.idle():
                idle = now - model.last_used
                if idle >= ttl:
                    self.unload(model, f"idle for {idle:.0f} s (WHISPER_MODEL_TTL={ttl:g})")


__all__ = ["Residency"]
