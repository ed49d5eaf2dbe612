"""Reading how much memory is free: NVML for a CUDA device, psutil (and cgroups) for host RAM.

The planner never reads memory itself; it is handed a :class:`MemorySnapshot` taken by one of
these probes, so planning stays a pure function and probes can be faked in tests.

The hard part of the CUDA probe is naming the right GPU. CTranslate2 is given a CUDA ordinal,
which counts only the devices ``CUDA_VISIBLE_DEVICES`` leaves and in CUDA's order; NVML counts
every GPU in PCI bus order and knows nothing of that variable. Reading the wrong GPU's free
memory would defeat the planner silently, so the mapping is done carefully: the CUDA driver is
asked for the ordinal's UUID and PCI bus id where it can be, and ``CUDA_VISIBLE_DEVICES`` is
interpreted as CUDA does otherwise. The mapping rules are pure functions, tested without a GPU.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

logger = logging.getLogger(__name__)

# cgroup v1 reports "no limit" as a huge page-aligned number rather than "max".
_CGROUP_UNLIMITED = 1 << 60
_PCI_BUS_ID = re.compile(r"^(?:([0-9a-f]+):)?([0-9a-f]+):([0-9a-f]+)\.([0-9a-f]+)$")
_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9a-f-]+)/(\d+)/(\d+)$", re.IGNORECASE)


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


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit of the cgroups this process is in.

    Attributes:
        limit: The limit in bytes.
        usage: Memory charged to that cgroup, less inactive file cache the kernel can reclaim
            (the "working set" container runtimes kill on).
        path: The cgroup directory the limit comes from.
    """

    limit: int
    usage: int
    path: str


def read_cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> CgroupMemory | None:
    """Find the memory limit that applies to this process, if any (cgroup v2, then v1).

    Args:
        root: Where the cgroup file system is mounted.
        proc_cgroup: This process's cgroup membership file.

    Returns:
        The smallest limit among this process's cgroup and its ancestors, or None if unlimited.
    """
    best: CgroupMemory | None = None
    for directory in _cgroup_v2_dirs(root, proc_cgroup):
        limit = _read_int(directory / "memory.max")
        if limit is None or limit >= _CGROUP_UNLIMITED:
            continue
        if best is None or limit < best.limit:
            current = _read_int(directory / "memory.current") or 0
            inactive = _read_stat(directory / "memory.stat", "inactive_file")
            best = CgroupMemory(limit, max(0, current - inactive), str(directory))
    if best is not None:
        return best
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is None or limit >= _CGROUP_UNLIMITED:
        return None
    usage = _read_int(v1 / "memory.usage_in_bytes") or 0
    inactive = _read_stat(v1 / "memory.stat", "total_inactive_file")
    return CgroupMemory(limit, max(0, usage - inactive), str(v1))


def _cgroup_v2_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    # The process's own cgroup and every ancestor up to the mount point: a limit set on a
    # parent (a systemd slice, a pod) binds just as hard as one set on the leaf.
    dirs = [root]
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                relative = Path(line[3:].strip().lstrip("/"))
                parts = relative.parts
                dirs.extend(root.joinpath(*parts[: i + 1]) for i in range(len(parts)))
    except OSError:
        pass
    return dirs


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


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


# ---- CUDA devices: the pure mapping ----------------------------------------------------------


@dataclass(frozen=True)
class NvmlMigInfo:
    """One MIG slice as NVML lists it under its parent GPU.

    Attributes:
        index: Slot under the parent (``nvmlDeviceGetMigDeviceHandleByIndex``).
        uuid: ``MIG-...`` UUID.
        gpu_instance_id: GPU instance id, for the legacy ``MIG-GPU-<uuid>/<gi>/<ci>`` form.
        compute_instance_id: Compute instance id, likewise.
    """

    index: int
    uuid: str
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class NvmlDeviceInfo:
    """One physical GPU as NVML lists it.

    Attributes:
        index: NVML's index (PCI bus order, all GPUs, ignoring ``CUDA_VISIBLE_DEVICES``).
        uuid: ``GPU-...`` UUID.
        pci_bus_id: As NVML writes it (``00000000:17:00.0``).
        name: Product name.
        mig_enabled: Whether MIG mode is on (then CUDA only runs on its slices).
        mig_devices: The slices that exist.
    """

    index: int
    uuid: str
    pci_bus_id: str
    name: str = ""
    mig_enabled: bool = False
    mig_devices: tuple[NvmlMigInfo, ...] = ()


@dataclass(frozen=True)
class VisibleDevice:
    """What one CUDA ordinal is: a whole GPU, or one MIG slice of it."""

    gpu: NvmlDeviceInfo
    mig: NvmlMigInfo | None = None

    @property
    def uuid(self) -> str:
        """The UUID of the slice if there is one, else of the GPU."""
        return self.mig.uuid if self.mig is not None else self.gpu.uuid


@dataclass(frozen=True)
class CudaIdentity:
    """What the CUDA driver says about an ordinal.

    Attributes:
        uuid: The 32 hex digits of the device (or MIG slice) UUID, dashed, no prefix.
        pci_bus_id: As the driver writes it (``0000:17:00.0``).
    """

    uuid: str | None
    pci_bus_id: str | None


def parse_pci_bus_id(text: str) -> tuple[int, int, int, int] | None:
    """Domain, bus, device and function of a PCI bus id, whatever the domain's width.

    NVML writes an 8-digit domain (``00000000:17:00.0``) and CUDA a 4-digit one
    (``0000:17:00.0``); comparing the strings would never match.

    Args:
        text: The bus id.

    Returns:
        The four numbers, or None if it is not a bus id.
    """
    match = _PCI_BUS_ID.match(text.strip().lower())
    if match is None:
        return None
    domain, bus, device, function = match.groups()
    return int(domain or "0", 16), int(bus, 16), int(device, 16), int(function, 16)


def _uuid_hex(text: str) -> str:
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return text.replace("-", "")


def _cuda_order(devices: Sequence[NvmlDeviceInfo]) -> list[NvmlDeviceInfo]:
    # CUDA numbers devices fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID. Which is fastest
    # is not knowable here, so PCI order is used: exact for identical GPUs and for PCI_BUS_ID;
    # NvmlProbe checks it against the driver where it can.
    return sorted(devices, key=lambda d: parse_pci_bus_id(d.pci_bus_id) or (1 << 32, d.index))


def _by_prefix(
    candidates: Sequence[tuple[str, VisibleDevice]], prefix: str
) -> VisibleDevice | None:
    # CUDA accepts any unambiguous prefix of a UUID.
    wanted = _uuid_hex(prefix)
    if not wanted:
        return None
    hits = [device for uuid, device in candidates if _uuid_hex(uuid).startswith(wanted)]
    return hits[0] if len(hits) == 1 else None


def resolve_visible_devices(
    env_value: str | None, devices: Sequence[NvmlDeviceInfo]
) -> list[VisibleDevice]:
    """The devices CUDA numbers 0, 1, ... in this process, as CUDA reads ``CUDA_VISIBLE_DEVICES``.

    Entries may be integers (positions in CUDA's own enumeration), ``GPU-<uuid>`` or
    ``MIG-<uuid>`` (any unambiguous prefix), or the legacy ``MIG-GPU-<uuid>/<gi>/<ci>``. As in
    CUDA, the list ends at the first entry that names nothing (or repeats one); an empty value
    hides every device. A MIG-enabled GPU runs CUDA only on its slices, and a process can use
    one slice at most, so later slices are dropped.

    Args:
        env_value: The variable's value, or None when unset.
        devices: Every GPU NVML knows.

    Returns:
        The visible devices; position i is CUDA ordinal i.
    """
    ordered = _cuda_order(devices)
    if env_value is None:
        visible = [_whole_or_first_slice(gpu) for gpu in ordered]
        return _one_slice_at_most([v for v in visible if v is not None])

    gpus = [(gpu.uuid, VisibleDevice(gpu)) for gpu in ordered]
    slices = [(mig.uuid, VisibleDevice(gpu, mig)) for gpu in ordered for mig in gpu.mig_devices]
    chosen: list[VisibleDevice] = []
    for raw in env_value.split(","):
        entry = raw.strip()
        found: VisibleDevice | None = None
        legacy = _LEGACY_MIG.match(entry)
        if entry.isdigit():
            position = int(entry)
            found = _whole_or_first_slice(ordered[position]) if position < len(ordered) else None
        elif legacy is not None:
            gpu_uuid, gi, ci = legacy.group(1), int(legacy.group(2)), int(legacy.group(3))
            found = next(
                (
                    device
                    for _, device in slices
                    if _uuid_hex(device.gpu.uuid) == _uuid_hex(gpu_uuid)
                    and device.mig is not None
                    and (device.mig.gpu_instance_id, device.mig.compute_instance_id) == (gi, ci)
                ),
                None,
            )
        elif entry.lower().startswith("gpu-"):
            gpu_hit = _by_prefix(gpus, entry)
            found = _whole_or_first_slice(gpu_hit.gpu) if gpu_hit is not None else None
        elif entry.lower().startswith("mig-"):
            found = _by_prefix(slices, entry)
        if found is None or found in chosen:
            break
        chosen.append(found)
    return _one_slice_at_most(chosen)


def _whole_or_first_slice(gpu: NvmlDeviceInfo) -> VisibleDevice | None:
    if not gpu.mig_enabled:
        return VisibleDevice(gpu)
    return VisibleDevice(gpu, gpu.mig_devices[0]) if gpu.mig_devices else None


def _one_slice_at_most(visible: list[VisibleDevice]) -> list[VisibleDevice]:
    result: list[VisibleDevice] = []
    seen_slice = False
    for device in visible:
        if device.mig is not None:
            if seen_slice:
                continue
            seen_slice = True
        result.append(device)
    return result


def match_cuda_identity(
    identity: CudaIdentity, devices: Sequence[NvmlDeviceInfo]
) -> VisibleDevice | None:
    """The NVML device the CUDA driver described, by UUID first, then by PCI bus id.

    Args:
        identity: What the driver reported for an ordinal.
        devices: Every GPU NVML knows.

    Returns:
        The device, or None if nothing matches or a bus id alone cannot tell MIG slices apart.
    """
    if identity.uuid:
        wanted = _uuid_hex(identity.uuid)
        for gpu in devices:
            for mig in gpu.mig_devices:
                if _uuid_hex(mig.uuid) == wanted:
                    return VisibleDevice(gpu, mig)
        for gpu in devices:
            if _uuid_hex(gpu.uuid) == wanted:
                if gpu.mig_enabled:
                    # An old driver gave the parent's UUID for a slice; only one slice is safe.
                    return (
                        VisibleDevice(gpu, gpu.mig_devices[0])
                        if len(gpu.mig_devices) == 1
                        else None
                    )
                return VisibleDevice(gpu)
    if identity.pci_bus_id:
        bus = parse_pci_bus_id(identity.pci_bus_id)
        for gpu in devices:
            if bus is not None and parse_pci_bus_id(gpu.pci_bus_id) == bus:
                if gpu.mig_enabled:
                    return (
                        VisibleDevice(gpu, gpu.mig_devices[0])
                        if len(gpu.mig_devices) == 1
                        else None
                    )
                return VisibleDevice(gpu)
    return None


# ---- CUDA devices: NVML and the driver -------------------------------------------------------


def _load_nvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise ProbeUnavailable("the nvidia-ml-py package (module pynvml) is not installed") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cuda_driver_identity(ordinal: int) -> CudaIdentity | None:
    """Ask the CUDA driver (``libcuda``) which device an ordinal is, without creating a context.

    ``cuInit`` only loads the driver; no GPU memory is allocated. It respects
    ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` exactly as CTranslate2 will.

    Args:
        ordinal: The CUDA device index.

    Returns:
        Its identity, or None when the driver library is missing or the call fails.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    try:
        if lib.cuInit(0) != 0:
            return None
        device = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return None
        buffer = ctypes.create_string_buffer(64)
        bus = buffer.value.decode() if lib.cuDeviceGetPCIBusId(buffer, 64, device) == 0 else None
        uuid = None
        raw = (ctypes.c_ubyte * 16)()
        # The _v2 call returns a MIG slice's own UUID; the original returns its parent's.
        get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or getattr(lib, "cuDeviceGetUuid", None)
        if get_uuid is not None and get_uuid(raw, device) == 0:
            digits = bytes(raw).hex()
            uuid = "-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:]))
        return CudaIdentity(uuid=uuid, pci_bus_id=bus)
    except (AttributeError, OSError, ValueError):
        return None


def enumerate_nvml(nvml: Any) -> tuple[list[NvmlDeviceInfo], dict[str, Any]]:
    """Every GPU and MIG slice NVML knows, with their handles by UUID.

    Args:
        nvml: The initialised ``pynvml`` module (or a fake with the same functions).

    Returns:
        The devices in NVML order, and a handle for each GPU and slice UUID.
    """
    devices: list[NvmlDeviceInfo] = []
    handles: dict[str, Any] = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        handles[uuid] = handle
        mig_enabled, slices = _mig_slices(nvml, handle, handles)
        devices.append(
            NvmlDeviceInfo(
                index=index,
                uuid=uuid,
                pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                mig_enabled=mig_enabled,
                mig_devices=tuple(slices),
            )
        )
    return devices, handles


def _mig_slices(nvml: Any, handle: Any, handles: dict[str, Any]) -> tuple[bool, list[NvmlMigInfo]]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:
        return False, []  # GPUs without MIG answer "not supported"
    if current != nvml.NVML_DEVICE_MIG_ENABLE:
        return False, []
    slices: list[NvmlMigInfo] = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:
            continue  # an empty slot
        uuid = _text(nvml.nvmlDeviceGetUUID(mig))
        handles[uuid] = mig
        slices.append(
            NvmlMigInfo(
                index=slot,
                uuid=uuid,
                gpu_instance_id=_optional(nvml, "nvmlDeviceGetGpuInstanceId", mig),
                compute_instance_id=_optional(nvml, "nvmlDeviceGetComputeInstanceId", mig),
            )
        )
    return True, slices


def _optional(nvml: Any, function: str, handle: Any) -> int | None:
    # Only needed for the legacy MIG-GPU-<uuid>/<gi>/<ci> form; older bindings lack them.
    call = getattr(nvml, function, None)
    if call is None:
        return None
    try:
        return int(call(handle))
    except nvml.NVMLError:
        return None


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
                    f"NVML cannot read the GPUs ({_text(exc)}); is the NVIDIA driver installed?"
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
                f"NVML cannot read the memory of CUDA device {self.cuda_index}: {_text(exc)}"
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
            f"{count} CUDA device(s), but NVML cannot be read ({_text(exc)}), "
            "so GPU memory cannot be planned"
        )
    return True, f"{count} CUDA device(s) visible to CTranslate2"


def open_probe(device: str, index: int = 0) -> MemoryProbe:
    """The memory probe for a device.

    Args:
        device: ``cuda`` or ``cpu``.
        index: The CUDA ordinal (ignored for ``cpu``).

    Returns:
        An :class:`NvmlProbe` already matched to its GPU, or a :class:`HostProbe`.

    Raises:
        ProbeUnavailable: ``cuda`` was asked for and NVML or the device is missing.
        ValueError: Unknown device kind.
    """
    if device == "cpu":
        return HostProbe()
    if device == "cuda":
        probe = NvmlProbe(index)
        probe.open()
        return probe
    raise ValueError(f"unknown device {device!r}; expected 'cuda' or 'cpu'")


# ---- peak sampling ---------------------------------------------------------------------------


@dataclass
class PeakReading:
    """What :func:`peak_sampler` saw; filled in while the block runs.

    Attributes:
        baseline: ``used`` when sampling started.
        peak: The highest ``used`` seen.
        samples: How many readings were taken.
        errors: Readings that failed (the probe raised).
    """

    baseline: int = 0
    peak: int = 0
    samples: int = 0
    errors: int = 0

    @property
    def delta(self) -> int:
        """How far usage rose above the baseline at its peak."""
        return max(0, self.peak - self.baseline)


@contextmanager
def sample_peak(read: Callable[[], int], interval_ms: float = 10.0) -> Iterator[PeakReading]:
    """Call ``read`` in a thread every ``interval_ms`` while the block runs, keeping the peak.

    Allocations shorter than the interval can be missed; calibration adds a margin for that.

    Args:
        read: Returns the quantity to watch (bytes used); may raise :class:`ProbeUnavailable`.
        interval_ms: Time between readings.

    Yields:
        The reading, complete once the block exits.
    """
    reading = PeakReading()
    reading.baseline = reading.peak = read()
    reading.samples = 1
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_ms / 1000):
            try:
                value = read()
            except ProbeUnavailable:
                reading.errors += 1
                continue
            reading.samples += 1
            reading.peak = max(reading.peak, value)

    thread = threading.Thread(target=sample, name="memory-peak-sampler", daemon=True)
    thread.start()
    try:
        yield reading
    finally:
        stop.set()
        thread.join()
        try:
            reading.peak = max(reading.peak, read())
            reading.samples += 1
        except ProbeUnavailable:
            reading.errors += 1


def peak_sampler(
    probe: MemoryProbe, interval_ms: float = 10.0, *, host: bool = False
) -> AbstractContextManager[PeakReading]:
    """Sample a probe's ``used`` while the block runs, keeping the peak (see
    :func:`sample_peak`). Usage counts every process on the device, so measure on an otherwise
    idle one.

    Args:
        probe: What to read.
        interval_ms: Time between readings.
        host: Sample host RAM instead of the device.
    """

    def used() -> int:
        snapshot = probe.snapshot()
        return (snapshot.host if host else snapshot.device).used

    return sample_peak(used, interval_ms)
