"""Measured peaks of one model on one device (``memory_profile.json``, written by the calibration
command): the :class:`Profile` the cost model prefers to its own arithmetic where it has a
point."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from server.memory.cost import Shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfilePoint:
    """One measured peak: working memory above the idle model while one shape ran."""

    batch_size: int
    beam_size: int
    word_timestamps: bool
    chunk_length: int
    peak_bytes: int


@dataclass(frozen=True)
class Profile:
    """Measured peaks of one model on one device and compute type (``memory_profile.json``).

    Attributes:
        model: Model name or path.
        device: ``cuda`` or ``cpu``.
        device_name: The GPU's product name (peaks differ between GPUs), or ``cpu``.
        compute_type: The compute type measured.
        points: The measurements.
    """

    FILENAME: ClassVar[str] = "memory_profile.json"
    VERSION: ClassVar[int] = 1

    model: str
    device: str
    device_name: str
    compute_type: str
    points: tuple[ProfilePoint, ...] = ()

    def matches(self, *, device: str, compute_type: str, device_name: str | None = None) -> bool:
        """Whether this profile describes a model loaded this way.

        Args:
            device: ``cuda`` or ``cpu``.
            compute_type: The compute type the model is loaded with.
            device_name: The GPU's name, when known; None skips that check.

        Returns:
            True if the measurements apply.
        """
        return (
            self.device == device
            and self.compute_type == compute_type
            and (device_name is None or device_name == self.device_name)
        )

    def with_point(self, point: ProfilePoint) -> Profile:
        """A copy with ``point`` added, replacing any earlier measurement of the same shape."""
        key = _point_key(point)
        kept = tuple(p for p in self.points if _point_key(p) != key)
        return replace(self, points=(*kept, point))

    def lookup(self, shape: Shape) -> int | None:
        """Peak working memory for ``shape``, from the measurements.

        Points with the same beam size, word timestamps and chunk length are interpolated
        linearly in batch size; outside the measured range the nearest segment's slope is
        extended (never downward as the batch grows). With a single point, larger batches
        scale proportionally and smaller ones keep the measured value.

        Args:
            shape: The shape.

        Returns:
            Bytes, or None when nothing measured applies (other device, compute type, beam...).
        """
        if shape.device != self.device or shape.compute_type != self.compute_type:
            return None
        series = sorted(
            {
                p.batch_size: p.peak_bytes
                for p in self.points
                if (p.beam_size, p.word_timestamps, p.chunk_length)
                == (shape.beam_size, shape.word_timestamps, shape.chunk_length)
            }.items()
        )
        if not series:
            return None
        batch = shape.batch_size
        exact = dict(series).get(batch)
        if exact is not None:
            return exact
        if len(series) == 1:
            b0, v0 = series[0]
            return math.ceil(v0 * batch / b0) if batch > b0 else v0
        if batch < series[0][0]:
            (b0, v0), (b1, v1) = series[0], series[1]
        elif batch > series[-1][0]:
            (b0, v0), (b1, v1) = series[-2], series[-1]
        else:
            (b0, v0), (b1, v1) = next(
                (series[i], series[i + 1])
                for i in range(len(series) - 1)
                if series[i][0] <= batch <= series[i + 1][0]
            )
        slope = max(0.0, (v1 - v0) / (b1 - b0))
        anchor_b, anchor_v = (b1, v1) if batch > b1 else (b0, v0)
        return max(0, math.ceil(anchor_v + slope * (batch - anchor_b)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "version": self.VERSION,
            "model": self.model,
            "device": self.device,
            "device_name": self.device_name,
            "compute_type": self.compute_type,
            "points": [
                {
                    "batch_size": p.batch_size,
                    "beam_size": p.beam_size,
                    "word_timestamps": p.word_timestamps,
                    "chunk_length": p.chunk_length,
                    "peak_bytes": p.peak_bytes,
                }
                for p in sorted(self.points, key=_point_key)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Parse the JSON form.

        Raises:
            ValueError: A field is missing or of the wrong type.
        """
        try:
            points = tuple(
                ProfilePoint(
                    batch_size=int(p["batch_size"]),
                    beam_size=int(p["beam_size"]),
                    word_timestamps=bool(p["word_timestamps"]),
                    chunk_length=int(p["chunk_length"]),
                    peak_bytes=int(p["peak_bytes"]),
                )
                for p in data["points"]
            )
            return cls(
                model=str(data["model"]),
                device=str(data.get("device", "cuda")),
                device_name=str(data["device_name"]),
                compute_type=str(data["compute_type"]),
                points=points,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a memory profile: {exc!r}") from exc

    @classmethod
    def load(cls, path: Path) -> Profile | None:
        """Read a profile; a folder means its ``memory_profile.json``.

        A missing or damaged file gives None (the model's own estimate is the safe fallback);
        damage is logged.

        Args:
            path: The file or the model folder.

        Returns:
            The profile, or None.
        """
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILENAME
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring memory profile %s: %s", path, exc)
            return None

    def save(self, path: Path) -> Path:
        """Write the profile atomically (a half-written profile would be worse than none).

        Args:
            path: The file, or the model folder to write ``memory_profile.json`` into.

        Returns:
            The file written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / self.FILENAME
        fd, tmp = tempfile.mkstemp(prefix=".memory_profile.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _point_key(point: ProfilePoint) -> tuple[int, bool, int, int]:
    return (point.beam_size, point.word_timestamps, point.chunk_length, point.batch_size)


__all__ = ["Profile", "ProfilePoint"]
