"""Memory: read what is free, estimate what a request needs, plan it to fit.

The server's promise is that it never dies of an out-of-memory error. Before each request the
engine takes a :class:`MemorySnapshot` from a probe (NVML for a GPU, psutil for host RAM), asks
the :class:`CostModel` what the requested :class:`Shape` needs, and lets the pure
:func:`plan_request` return a :class:`Plan`: run as asked, degrade (smaller batch, shorter
windows, greedy, no word timestamps), wait, fall back to the CPU, or reject. Running requests
hold :class:`Reservations` so concurrent plans do not count the same free memory twice.
"""

from server.memory.admission import Reservation, Reservations
from server.memory.cost import (
    KNOWN_DIMS,
    CostEstimate,
    CostModel,
    ModelDims,
    ModelHeader,
    ModelVariable,
    Profile,
    ProfilePoint,
    Shape,
    dims_from_header,
    read_model_dims,
    read_model_header,
    shapes_grid,
    whisper_param_counts,
)
from server.memory.planner import (
    CHUNK_LENGTHS,
    DEFAULT_LADDER,
    Budget,
    Degradation,
    Plan,
    PlanRequest,
    Policy,
    Step,
    choose_host_chunk,
    memory_budget,
    plan_request,
)
from server.memory.probes import (
    CudaIdentity,
    DeviceMemory,
    HostProbe,
    MemoryProbe,
    MemorySnapshot,
    NvmlDeviceInfo,
    NvmlMigInfo,
    NvmlProbe,
    PeakReading,
    ProbeUnavailable,
    VisibleDevice,
    cuda_available,
    match_cuda_identity,
    open_probe,
    peak_sampler,
    resolve_visible_devices,
    sample_peak,
)
from server.memory.sizes import MemoryAmount, format_bytes

__all__ = [
    "CHUNK_LENGTHS",
    "DEFAULT_LADDER",
    "KNOWN_DIMS",
    "Budget",
    "CostEstimate",
    "CostModel",
    "CudaIdentity",
    "Degradation",
    "DeviceMemory",
    "HostProbe",
    "MemoryAmount",
    "MemoryProbe",
    "MemorySnapshot",
    "ModelDims",
    "ModelHeader",
    "ModelVariable",
    "NvmlDeviceInfo",
    "NvmlMigInfo",
    "NvmlProbe",
    "PeakReading",
    "Plan",
    "PlanRequest",
    "Policy",
    "ProbeUnavailable",
    "Profile",
    "ProfilePoint",
    "Reservation",
    "Reservations",
    "Shape",
    "Step",
    "VisibleDevice",
    "choose_host_chunk",
    "cuda_available",
    "dims_from_header",
    "format_bytes",
    "match_cuda_identity",
    "memory_budget",
    "open_probe",
    "peak_sampler",
    "plan_request",
    "read_model_dims",
    "read_model_header",
    "resolve_visible_devices",
    "sample_peak",
    "shapes_grid",
    "whisper_param_counts",
]
