"""Reading how much memory is free: NVML for a CUDA device, psutil (and cgroups) for host RAM.

The planner never reads memory itself; it is handed a :class:`MemorySnapshot` taken by one of
these probes, so planning stays a pure function and probes can be faked in tests. Which GPU a
CUDA ordinal is, is worked out in :mod:`server.memory.gpu_identity`; the container's memory
limit in :mod:`server.memory.cgroups`.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

from server.memory.cgroups import read_cgroup_memory
from server.memory.gpu_identity import (
    CudaIdentity,
    NvmlDeviceInfo,
    VisibleDevice,
    cuda_driver_identity,
    enumerate_nvml,
    match_cuda_identity,
    nvml_text,
    resolve_visible_devices,
)

logger = logging.getLogger(__name__)


class ProbeUnavailable(RuntimeError):
    """Memory on a device cannot be read (no driver, no GPU, the GPU is hidden, NVML failed).

    Attributes:
        reason: What is missing, in words a person can act on.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DeviceMemory:
    """Memory of one device at one moment, in bytes.

    Attributes:
        kind: ``cuda`` for a GPU (or MIG slice), ``cpu`` for host RAM.
        index: The CUDA ordinal as this process sees it; 0 for host RAM.
        name: Product name (``NVIDIA H100 80GB HBM3``) or ``host RAM``.
        uuid: ``GPU-...`` or ``MIG-...`` for CUDA devices; None for host RAM.
        total: Capacity (for host RAM, the cgroup limit when that is smaller).
        free: What can still be allocated.
        used: What is allocated, by every process.
        mig: Whether this is a MIG slice of a larger GPU.
    """

    kind: Literal["cuda", "cpu"]
    index: int
    name: str
    uuid: str | None
    total: int
    free: int
    used: int
    mig: bool = False


@dataclass(frozen=True)
class MemorySnapshot:
    """What the planner sees: the model's device and host RAM, read together.

    Attributes:
        device: The device the model runs on; for CPU serving this is host RAM again.
        host: Host RAM, where decoded audio and features always live.
        taken_at: ``time.monotonic()`` when it was read.
    """

    device: DeviceMemory
    host: DeviceMemory
    taken_at: float


class MemoryProbe(Protocol):
    """Something that reads a device's memory."""

    def snapshot(self) -> MemorySnapshot:
        """Read the device and host RAM now.

        Raises:
            ProbeUnavailable: The device can no longer be read.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """What is being read and how, for logs and ``GET /v1/memory``."""
        ...


# ---- host RAM --------------------------------------------------------------------------------


class HostProbe:
    """Reads host RAM: psutil's ``available`` as free, capped by a cgroup limit if smaller."""

    def __init__(self, cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
        self._cgroup_root = cgroup_root

    def read(self) -> DeviceMemory:
        """Host RAM now.

        Returns:
            Host memory; when a cgroup limit is below physical RAM, total is the limit and free
            is what is left under it (or what the machine has, if that is less).
        """
        vm = psutil.virtual_memory()
        total, free, used = int(vm.total), int(vm.available), int(vm.total - vm.available)
        name = "host RAM"
        cgroup = read_cgroup_memory(self._cgroup_root)
        if cgroup is not None and cgroup.limit < total:
            total = cgroup.limit
            used = cgroup.usage
            free = min(free, max(0, cgroup.limit - cgroup.usage))
            name = "host RAM (cgroup limit)"
        return DeviceMemory("cpu", 0, name, None, total, free, used)

    def snapshot(self) -> MemorySnapshot:
        """Host RAM as both the device and the host (CPU serving)."""
        host = self.read()
        return MemorySnapshot(device=host, host=host, taken_at=time.monotonic())

    def describe(self) -> dict[str, Any]:
        """Where host memory is read from."""
        cgroup = read_cgroup_memory(self._cgroup_root)
        return {
            "kind": "cpu",
            "source": "psutil",
            "cgroup_limit": cgroup.limit if cgroup is not None else None,
            "cgroup_path": cgroup.path if cgroup is not None else None,
        }


# ---- CUDA devices ----------------------------------------------------------------------------


def _load_nvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise ProbeUnavailable("the nvidia-ml-py package (module pynvml) is not installed") from exc


_nvml_lock = threading.Lock()


class NvmlProbe:
    """Reads one CUDA device's memory through NVML; MIG slices read as their own device.

    NVML is initialised on first use, not at construction, so building a probe never fails.

    Args:
        cuda_index: The CUDA ordinal CTranslate2 is given (after ``CUDA_VISIBLE_DEVICES``).
        nvml: The ``pynvml`` module; tests pass a fake.
        environ: Where ``CUDA_VISIBLE_DEVICES`` is read; the process environment by default.
        driver_identity: Asks the CUDA driver which device an ordinal is; None to skip it.
        host: Reads host RAM for the snapshot's ``host`` half.
    """

    def __init__(
        self,
        cuda_index: int,
        *,
        nvml: Any = None,
        environ: Mapping[str, str] | None = None,
        driver_identity: Callable[[int], CudaIdentity | None] | None = cuda_driver_identity,
        host: HostProbe | None = None,
    ) -> None:
        self.cuda_index = cuda_index
        self._nvml = nvml
        self._environ = environ if environ is not None else os.environ
        self._driver_identity = driver_identity
        self._host = host or HostProbe()
        self._handle: Any = None
        self._device: VisibleDevice | None = None
        self._mapped_by = ""
        self._initialised = False

    def open(self) -> VisibleDevice:
        """Initialise NVML and find the device; idempotent.

        Returns:
            The GPU or MIG slice this ordinal is.

        Raises:
            ProbeUnavailable: NVML cannot start, or no device has this ordinal.
        """
        with _nvml_lock:
            if self._device is not None:
                return self._device
            nvml = self._nvml if self._nvml is not None else _load_nvml()
            self._nvml = nvml
            try:
                if not self._initialised:
                    nvml.nvmlInit()
                    self._initialised = True
                devices, handles = enumerate_nvml(nvml)
            except nvml.NVMLError as exc:
                raise ProbeUnavailable(
                    f"NVML cannot read the GPUs ({nvml_text(exc)}); is the NVIDIA driver installed?"
                ) from exc
            device, mapped_by = self._locate(devices)
            self._handle = handles[device.uuid]
            self._device, self._mapped_by = device, mapped_by
            logger.info(
                "CUDA device %d is %s %s (NVML index %d, PCI %s%s), matched by %s",
                self.cuda_index,
                device.gpu.name,
                device.uuid,
                device.gpu.index,
                device.gpu.pci_bus_id,
                ", MIG slice" if device.mig is not None else "",
                mapped_by,
            )
            return device

    def _locate(self, devices: Sequence[NvmlDeviceInfo]) -> tuple[VisibleDevice, str]:
        env_value = self._environ.get("CUDA_VISIBLE_DEVICES")
        visible = resolve_visible_devices(env_value, devices)
        by_env = visible[self.cuda_index] if 0 <= self.cuda_index < len(visible) else None
        identity = self._driver_identity(self.cuda_index) if self._driver_identity else None
        by_driver = match_cuda_identity(identity, devices) if identity is not None else None
        if by_driver is not None:
            if by_env is not None and by_env != by_driver:
                # The driver knows CUDA's real order (FASTEST_FIRST on mixed GPUs); trust it.
                logger.warning(
                    "CUDA_VISIBLE_DEVICES=%r suggests CUDA device %d is %s but the CUDA driver "
                    "says %s; using the driver's answer",
                    env_value,
                    self.cuda_index,
                    by_env.uuid,
                    by_driver.uuid,
                )
            return by_driver, "CUDA driver UUID/PCI bus id"
        if by_env is None:
            raise ProbeUnavailable(
                f"no CUDA device {self.cuda_index}: NVML lists {len(devices)} GPU(s) and "
                f"CUDA_VISIBLE_DEVICES={env_value!r} leaves {len(visible)} visible"
            )
        order = self._environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        if order != "PCI_BUS_ID" and len({d.name for d in devices}) > 1:
            logger.warning(
                "GPUs of different models and CUDA_DEVICE_ORDER=%s: CUDA may number them "
                "differently from PCI order; set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure "
                "the memory of the right GPU is read",
                order,
            )
        return by_env, "CUDA_VISIBLE_DEVICES"

    def snapshot(self) -> MemorySnapshot:
        """Read the device's memory (and host RAM).

        Raises:
            ProbeUnavailable: NVML failed (driver gone, GPU fallen off the bus).
        """
        device = self.open()
        nvml = self._nvml
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except nvml.NVMLError as exc:
            raise ProbeUnavailable(
                f"NVML cannot read the memory of CUDA device {self.cuda_index}: {nvml_text(exc)}"
            ) from exc
        memory = DeviceMemory(
            kind="cuda",
            index=self.cuda_index,
            name=device.gpu.name,
            uuid=device.uuid,
            total=int(info.total),
            free=int(info.free),
            used=int(info.used),
            mig=device.mig is not None,
        )
        return MemorySnapshot(device=memory, host=self._host.read(), taken_at=time.monotonic())

    def describe(self) -> dict[str, Any]:
        """Which GPU is read and how it was identified."""
        device = self.open()
        return {
            "kind": "cuda",
            "index": self.cuda_index,
            "name": device.gpu.name,
            "uuid": device.uuid,
            "nvml_index": device.gpu.index,
            "pci_bus_id": device.gpu.pci_bus_id,
            "mig": device.mig is not None,
            "matched_by": self._mapped_by,
            "cuda_visible_devices": self._environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def close(self) -> None:
        """Release NVML (it is reference-counted, so other probes keep working)."""
        with _nvml_lock:
            if self._initialised and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass
            self._initialised = False
            self._device = None
            self._handle = None


@dataclass(frozen=True)
class CublasNeeds:
    """What CTranslate2 loads from cuBLAS on the GPU: the sonames it dlopens and the functions
    it then resolves by name (nine for the 4.x wheels). Counting devices needs neither, so a
    host without them looks ready until the first GEMM."""

    libraries: tuple[str, ...] = ("libcublas.so.12",)
    functions: tuple[str, ...] = ("cublasCreate_v2",)


def cublas_needs() -> CublasNeeds:
    """Read :class:`CublasNeeds` off the installed CTranslate2's own shared library.

    Returns:
        The sonames and function names its binary holds, or the 4.x wheels' soname and
        ``cublasCreate_v2`` when it cannot be read.
    """
    try:
        ctranslate2 = importlib.import_module("ctranslate2")
        package = Path(str(ctranslate2.__file__)).resolve().parent
        candidates = sorted(package.parent.glob("ctranslate2.libs/libctranslate2*.so*"))
        candidates += sorted(package.glob("*.so*"))
        for library in candidates:
            with (
                open(library, "rb") as fh,
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data,
            ):
                names = set(re.findall(rb"libcublas\.so\.\d+", data))
                functions = set(re.findall(rb"(?<![A-Za-z0-9_])cublas[A-Z]\w+(?=\0)", data))
            if names:
                return CublasNeeds(
                    tuple(sorted(n.decode() for n in names)),
                    tuple(sorted(f.decode() for f in functions)) or CublasNeeds.functions,
                )
    except Exception:  # an odd install must not stop the server from starting on the CPU
        logger.debug("could not read CTranslate2's library for its cuBLAS needs", exc_info=True)
    return CublasNeeds()


def missing_cuda_library(needs: CublasNeeds) -> str | None:
    """Why cuBLAS cannot serve CTranslate2 here, or None if it can.

    Loads each library the way CTranslate2 will (``dlopen`` by soname, through
    ``LD_LIBRARY_PATH`` and the loader cache) and looks up the functions it resolves, so a
    missing library, a broken link, a missing dependency (``libcublasLt``), a file that is not
    cuBLAS and a cuBLAS of another version are all caught.

    Returns:
        A sentence naming the library and what failed, or None.
    """
    for name in needs.libraries:
        try:
            library = ctypes.CDLL(name)
        except OSError as exc:
            return (
                f"{name} cannot be loaded ({exc}): install the cuBLAS of that CUDA version "
                "(e.g. pip install nvidia-cublas-cu12) and put its folder on LD_LIBRARY_PATH"
            )
        missing = [f for f in needs.functions if not hasattr(library, f)]
        if missing:
            return (
                f"{name} loads but lacks {', '.join(missing)}: "
                "not the cuBLAS this CTranslate2 was built for"
            )
    return None


def cuda_available() -> tuple[bool, str]:
    """Whether this process can run on a GPU and read its memory.

    Returns:
        ``(True, "...")`` or ``(False, reason)``; never raises, whatever is missing.
    """
    try:
        ctranslate2 = importlib.import_module("ctranslate2")
        count = int(ctranslate2.get_cuda_device_count())
    except Exception as exc:  # a broken CUDA install can raise anything from the extension
        return False, f"CTranslate2 cannot query CUDA: {exc}"
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return False, f"CTranslate2 sees no CUDA device: no NVIDIA GPU or driver{hint}"
    missing = missing_cuda_library(cublas_needs())
    if missing is not None:
        return False, f"{count} CUDA device(s), but {missing}"
    try:
        nvml = _load_nvml()
    except ProbeUnavailable as exc:
        return False, f"{count} CUDA device(s), but {exc.reason}, so GPU memory cannot be read"
    try:
        with _nvml_lock:
            nvml.nvmlInit()
            try:
                nvml.nvmlDeviceGetCount()
            finally:
                nvml.nvmlShutdown()
    except nvml.NVMLError as exc:
        return False, (
            f"{count} CUDA device(s), but NVML cannot be read ({nvml_text(exc)}), "
            "so GPU memory cannot be planned"
        )
    return True, f"{count} CUDA device(s) visible to CTranslate2"


def device_kind(place: str) -> str:
    """``cuda`` for a GPU place (``cuda:1``), ``cpu`` for the CPU."""
    return place.split(":", 1)[0]


def device_ordinal(place: str) -> int:
    """The CUDA ordinal of a GPU place (``cuda:1`` -> 1); 0 for ``cpu`` and bare ``cuda``."""
    _, _, index = place.partition(":")
    return int(index) if index else 0


def open_probe(device: str, index: int = 0) -> MemoryProbe:
    """The memory probe for a device.

    Args:
        device: ``cpu``, ``cuda`` or a GPU place such as ``cuda:1``.
        index: The CUDA ordinal for a bare ``cuda`` (ignored otherwise).

    Returns:
        An :class:`NvmlProbe` already matched to its GPU, or a :class:`HostProbe`.

    Raises:
        ProbeUnavailable: ``cuda`` was asked for and NVML or the device is missing.
        ValueError: Unknown device kind.
    """
    if device == "cpu":
        return HostProbe()
    if device_kind(device) == "cuda":
        probe = NvmlProbe(device_ordinal(device) if ":" in device else index)
        probe.open()
        return probe
    raise ValueError(f"unknown device {device!r}; expected 'cuda' or 'cpu'")
