"""Models loaded on demand, one copy per (model, device), each with its cost model, held by
the requests using them; each load planned by the memory gate."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from server.config import Settings
from server.engine.store import ModelSource
from server.errors import ModelNotReadyError
from server.memory import (
    CostModel,
    Profile,
    Shape,
    device_kind,
    device_ordinal,
    format_bytes,
    read_model_dims,
)
from server.memory.gate import LoadNeeds, MemoryGate
from server.whisper.runner import WhisperRunner, download_model

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    """A faster-whisper model resident on one device, with its cost model.

    Attributes:
        source: Which model.
        device: Where: ``cpu``, or a GPU place such as ``cuda:0``.
        compute_type: As loaded (``float16``, ``int8``, ...).
        runner: The loaded model, and every call into it.
        cost: Its memory cost model; replaced (never mutated) when an out-of-memory error
            raises an estimate.
        weights_bytes: Resident size of the weights, counted against the device's budget.
        pinned: Never unloaded (the served model under WHISPER_PIN_DEFAULT_MODEL).
        in_use: Requests holding it now (see :meth:`ModelPool.checkout`); guarded by the pool.
        last_used: ``time.monotonic()`` when the last of them let go.
        unload_requested: Unload it once nothing holds it (``DELETE /v1/models/{id}``).
    """

    source: ModelSource
    device: str
    compute_type: str
    runner: WhisperRunner
    cost: CostModel
    weights_bytes: int
    loaded_at: float = field(default_factory=time.time)
    pinned: bool = False
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    unload_requested: bool = False

    @property
    def multilingual(self) -> bool:
        return self.runner.multilingual

    @property
    def label(self) -> str:
        """Its name, for what the memory gate says when it unloads it."""
        return self.source.id


class ModelPool:
    """Models loaded on demand, one copy per (model, device), until they are unloaded.

    Concurrent first uses of a model load it once. Each use holds the model through
    :meth:`checkout` / :meth:`release`, so a model in use is never unloaded.

    Args:
        settings: Compute type, threads and the model store.
        gate: Plans and reserves each load (:meth:`MemoryGate.room_for_load`); none: loads
            are not planned.
    """

    def __init__(self, settings: Settings, gate: MemoryGate | None = None) -> None:
        self._settings = settings
        self._gate = gate
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def loaded(self) -> list[LoadedModel]:
        with self._guard:
            return list(self._models.values())

    def resident_bytes(self, device: str) -> int:
        """Weights of every model loaded on ``device``."""
        return sum(m.weights_bytes for m in self.loaded() if m.device == device)

    def find(self, source: ModelSource, device: str) -> LoadedModel | None:
        """The model if it is loaded on ``device``, without loading it."""
        with self._guard:
            return self._models.get((source.load_target, device))

    def get(self, source: ModelSource, device: str, *, pinned: bool = False) -> LoadedModel:
        """The model ``source`` on ``device``, loading it if needed (not held: see
        :meth:`checkout` for a use that must not see it unloaded).

        Raises:
            ModelNotReadyError: the model cannot be loaded.
            InsufficientMemoryError: the gate found no room for it.
        """
        model = self.checkout(source, device, pinned=pinned)
        self.release(model)
        return model

    def checkout(
        self, source: ModelSource, device: str, *, pinned: bool = False, planned: bool = False
    ) -> LoadedModel:
        """Hold the model ``source`` on ``device`` (loading it if needed) until
        :meth:`release`; it is not unloaded while held. ``planned``: the caller's plan already
        holds room for loading it, so the gate is not asked again.

        Raises:
            ModelNotReadyError: the model cannot be loaded.
            InsufficientMemoryError: the gate found no room for it.
        """
        key = (source.load_target, device)
        with self._guard:
            model = self._models.get(key)
            if model is not None:
                model.in_use += 1
                return model
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                model = self._models.get(key)
                if model is not None:
                    model.in_use += 1
                    return model
            model = self._load(source, device, planned=planned)
            model.pinned = pinned
            model.in_use = 1
            with self._guard:
                self._models[key] = model
            return model

    def release(self, model: LoadedModel) -> None:
        """Let go of a model held by :meth:`checkout`."""
        with self._guard:
            model.in_use -= 1
            model.last_used = time.monotonic()

    def take_idle(self, model: LoadedModel) -> bool:
        """Remove ``model`` from the pool if nothing holds it and it is not pinned (the caller
        then frees it).

        Returns:
            Whether it was removed.
        """
        key = (model.source.load_target, model.device)
        with self._guard:
            if model.in_use or model.pinned or self._models.get(key) is not model:
                return False
            del self._models[key]
            return True

    def idle(
        self, device: str | None = None, *, exclude: LoadedModel | None = None
    ) -> list[LoadedModel]:
        """Models nothing holds and nothing pins (on ``device``), least recently used first."""
        with self._guard:
            found = [
                m
                for m in self._models.values()
                if not m.in_use
                and not m.pinned
                and m is not exclude
                and (device is None or m.device == device)
            ]
        return sorted(found, key=lambda m: m.last_used)

    def discard(self, source: ModelSource, device: str) -> None:
        """Forget the copy of ``source`` on ``device`` (it failed its test window); CTranslate2
        frees it when the last reference goes."""
        with self._guard:
            self._models.pop((source.load_target, device), None)

    def _download(self, source: ModelSource) -> Path:
        """Fetch a Hugging Face model into the store (only with WHISPER_ALLOW_DOWNLOADS)."""
        if not self._settings.allow_downloads:
            raise ModelNotReadyError(
                f"Model {source.id!r} is not in {self._settings.models_dir}; set "
                "WHISPER_ALLOW_DOWNLOADS=true to download it from Hugging Face."
            )
        target = self._settings.models_dir / str(source.repo).replace("/", "--")
        return download_model(str(source.repo), target)

    def _load(self, source: ModelSource, device: str, *, planned: bool = False) -> LoadedModel:
        settings = self._settings
        compute_type = settings.compute_type
        kind = device_kind(device)
        if compute_type == "auto":
            compute_type = "float16" if kind == "cuda" else "int8"
        started = time.perf_counter()
        try:
            folder = source.path or self._download(source)
        except ModelNotReadyError:
            raise
        except Exception as exc:  # huggingface_hub raises many kinds
            raise ModelNotReadyError(f"Model {source.id!r} could not be downloaded: {exc}") from exc
        try:
            dims = read_model_dims(folder)
        except Exception as exc:  # a broken or foreign config.json
            raise ModelNotReadyError(
                f"Model {source.id!r} could not be loaded on {device}: {exc}"
            ) from exc
        profile = Profile.load(folder / Profile.FILENAME)
        if profile is not None and not profile.matches(device=kind, compute_type=compute_type):
            profile = None
        cost = CostModel(dims, profile=profile)
        weights = cost.weights_bytes(compute_type)
        smallest = Shape(kind, compute_type, 1, 1, False, 30, False)
        needs = LoadNeeds(
            device_bytes=weights + cost.estimate(smallest).device_bytes,
            weights_bytes=weights,
            host_peak_bytes=cost.load_host_bytes(compute_type, kind),
        )
        gate = (
            self._gate.room_for_load(device, source.id, needs)
            if self._gate is not None and not planned
            else nullcontext()
        )
        with gate:
            try:
                runner = WhisperRunner.load(
                    folder,
                    device=kind,
                    device_index=device_ordinal(device),
                    compute_type=compute_type,
                    cpu_threads=settings.cpu_threads,
                    num_workers=settings.model_workers_on(kind),
                )
            except Exception as exc:  # CTranslate2 raises many kinds
                raise ModelNotReadyError(
                    f"Model {source.id!r} could not be loaded on {device}: {exc}"
                ) from exc
        logger.info(
            "loaded model %s on %s (%s) in %.1fs; weights about %s%s",
            source.id,
            device,
            compute_type,
            time.perf_counter() - started,
            format_bytes(weights),
            "; using measured memory profile" if profile is not None else "",
        )
        return LoadedModel(source, device, compute_type, runner, cost, weights)


__all__ = ["LoadedModel", "ModelPool"]
