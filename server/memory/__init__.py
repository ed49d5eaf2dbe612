"""Memory: read what is free, estimate what a request needs, plan it to fit.

The server's promise is that it never dies of an out-of-memory error. Before each piece of
work the engine takes a :class:`MemorySnapshot` from a probe (NVML for a GPU, psutil and cgroups
for host RAM), asks the :class:`CostModel` what the requested :class:`Shape` needs, and lets the
pure :func:`plan_request` return a :class:`Plan`: run as asked, step down the ladder of
:class:`Step` (smaller batch, shorter windows, greedy, no word timestamps), wait, fall back to
the CPU, or reject. Running work holds :class:`Reservations` so concurrent plans do not count
the same free memory twice.

The rooms: ``probes`` (with ``gpu_identity`` and ``cgroups``) read memory; ``model_file``
reads a model's dimensions; ``cost`` estimates (``profile``: measured peaks it prefers); ``planner`` decides (the ladder is defined
there, once); ``reservations`` is the ledger; ``peaks`` measures, for calibration and benches;
``sizes`` parses ``22GiB`` and ``90%``.
"""

from server.memory.cost import CostEstimate, CostModel, Shape
from server.memory.model_file import read_model_dims
from server.memory.planner import (
    Budget,
    Degradation,
    Plan,
    PlanRequest,
    Policy,
    Step,
    memory_budget,
    plan_request,
    step_down,
)
from server.memory.probes import (
    DeviceMemory,
    MemoryProbe,
    MemorySnapshot,
    ProbeUnavailable,
    cuda_available,
    device_kind,
    device_ordinal,
    open_probe,
)
from server.memory.profile import Profile, ProfilePoint
from server.memory.reservations import Reservation, Reservations
from server.memory.sizes import MemoryAmount, format_bytes

__all__ = [
    "Budget",
    "CostEstimate",
    "CostModel",
    "Degradation",
    "DeviceMemory",
    "MemoryAmount",
    "MemoryProbe",
    "MemorySnapshot",
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
    "cuda_available",
    "device_kind",
    "device_ordinal",
    "format_bytes",
    "memory_budget",
    "open_probe",
    "plan_request",
    "read_model_dims",
    "step_down",
]
