"""Models loaded on demand, one copy per (model, device), each with its cost model."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.config import Settings
from server.errors import ModelNotReadyError
from server.memory import CostModel, Profile, format_bytes, read_model_dims
from server.model_store import ModelSource
from server.runners import WhisperRunner, download_model

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A faster-whisper model resident on one device, with its cost model.

    Attributes:
        source: Which model.
        device: ``cuda`` or ``cpu``.
        compute_type: As loaded (``float16``, ``int8``, ...).
        runner: The loaded model, and every call into it.
        cost: Its memory cost model; replaced (never mutated) when an out-of-memory error
            raises an estimate.
        weights_bytes: Resident size of the weights, counted against the device's budget.
    """

    source: ModelSource
    device: str
    compute_type: str
    runner: WhisperRunner
    cost: CostModel
    weights_bytes: int
    loaded_at: float = field(default_factory=time.time)

    @property
    def multilingual(self) -> bool:
        return self.runner.multilingual


class ModelPool:
    """Loads models on first use and keeps them; concurrent first uses load once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
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

    def _load(self, source: ModelSource, device: str) -> LoadedModel:
        settings = self._settings
        compute_type = settings.compute_type
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        started = time.perf_counter()
        try:
            folder = source.path or self._download(source)
            runner = WhisperRunner.load(
                folder,
                device=device,
                device_index=settings.device_index,
                compute_type=compute_type,
                cpu_threads=settings.cpu_threads,
                num_workers=settings.max_concurrency,
            )
        except ModelNotReadyError:
            raise
        except Exception as exc:  # CTranslate2 and huggingface_hub raise many kinds
            raise ModelNotReadyError(
                f"Model {source.id!r} could not be loaded on {device}: {exc}"
            ) from exc
        dims = read_model_dims(folder)
        profile = Profile.load(folder / Profile.FILENAME)
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
        return LoadedModel(source, device, compute_type, runner, cost, weights)


__all__ = ["LoadedModel", "ModelPool"]
