"""Which GPU a CUDA ordinal is: the rules CUDA applies, and the NVML and driver calls behind them.

CTranslate2 is given a CUDA ordinal, which counts only the devices ``CUDA_VISIBLE_DEVICES``
leaves and in CUDA's order; NVML counts every GPU in PCI bus order and knows nothing of that
variable. Reading the wrong GPU's free memory would defeat the planner silently, so the mapping
is done carefully: the CUDA driver is asked for the ordinal's UUID and PCI bus id where it can
be, and ``CUDA_VISIBLE_DEVICES`` is interpreted as CUDA does otherwise. The mapping rules are
pure functions, tested without a GPU.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_PCI_BUS_ID = re.compile(r"^(?:([0-9a-f]+):)?([0-9a-f]+):([0-9a-f]+)\.([0-9a-f]+)$")
_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9a-f-]+)/(\d+)/(\d+)$", re.IGNORECASE)


# ---- the pure mapping ------------------------------------------------------------------------


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
                return _whole_or_only_slice(gpu)
    if identity.pci_bus_id:
        bus = parse_pci_bus_id(identity.pci_bus_id)
        for gpu in devices:
            if bus is not None and parse_pci_bus_id(gpu.pci_bus_id) == bus:
                return _whole_or_only_slice(gpu)
    return None


def _whole_or_only_slice(gpu: NvmlDeviceInfo) -> VisibleDevice | None:
    """A GPU named as a whole: itself, or with MIG on its one slice. An old driver gave the
    parent's UUID (or bus id) for a slice; with several slices which one is unknowable."""
    if not gpu.mig_enabled:
        return VisibleDevice(gpu)
    return VisibleDevice(gpu, gpu.mig_devices[0]) if len(gpu.mig_devices) == 1 else None


# ---- NVML and the driver --------------------------------------------------------------------


def nvml_text(value: Any) -> str:
    """NVML returns bytes from older bindings and str from newer ones."""
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
        uuid = nvml_text(nvml.nvmlDeviceGetUUID(handle))
        handles[uuid] = handle
        mig_enabled, slices = _mig_slices(nvml, handle, handles)
        devices.append(
            NvmlDeviceInfo(
                index=index,
                uuid=uuid,
                pci_bus_id=nvml_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                name=nvml_text(nvml.nvmlDeviceGetName(handle)),
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
        uuid = nvml_text(nvml.nvmlDeviceGetUUID(mig))
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
