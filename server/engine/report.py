"""What the engine tells: its counters, its recent plan decisions, and ``GET /v1/memory``.

Every plan a request's piece gets is recorded here (:meth:`Decisions.record`) with what it
changed and why, and gets its outcome when the request ends; ``/v1/memory``, the page and the
metrics read them. The counters that belong to other rooms (the gate's waits and rejections,
residency's unloads) are read from them, not copied.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.batching.policy import WorkClass
from server.memory import Plan, device_kind
from server.memory.gate import GateStats

if TYPE_CHECKING:
    from server.batching.scheduler import SchedulerStats
    from server.engine.core import Engine
    from server.engine.pool import LoadedModel
    from server.request import Job


@dataclass
class EngineStats:
    """Counters and recent decisions, for /v1/memory and /metrics.

    Attributes:
        gate: The memory gate's own counters (waits, rejections, plans waiting now).
        unloaded: Reads how many models residency has unloaded.
    """

    gate: GateStats = field(default_factory=GateStats)
    unloaded: Callable[[], int] = lambda: 0
    degradations: Counter[str] = field(default_factory=Counter)
    oom_recoveries: int = 0
    pieces_ahead: int = 0
    """Pieces of long files planned, read and queued while the piece before them still ran."""
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    running: int = 0
    """Requests inside :meth:`Engine.run` now (planned, decoding or waiting for memory)."""
    _counting: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def rejected(self) -> int:
        return self.gate.rejected

    @property
    def waits(self) -> int:
        return self.gate.waits

    @property
    def waiting_for_memory(self) -> int:
        """Plans (a request's piece, or a scheduler's batch) waiting for memory to free up."""
        return self.gate.waiting_for_memory

    @property
    def unloads(self) -> int:
        return self.unloaded()

    @contextmanager
    def counted_running(self) -> Iterator[None]:
        """Count a request as running while the block runs."""
        with self._counting:
            self.running += 1
        try:
            yield
        finally:
            with self._counting:
                self.running -= 1


class Decisions:
    """The plan decisions of recent requests (the last 50), with their outcomes.

    Args:
        stats: Where they are kept (``stats.recent``).
    """

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats
        #: Called with every plan recorded (the metrics' batch-size histogram).
        self.on_plan: Callable[[Plan], None] | None = None

    def record(self, job: Job, plan: Plan, waited: float, place: str, audio_seconds: float) -> None:
        """One decision: what ran where, what it asked and what it got, and why."""
        self.stats.recent.append(
            {
                "request_id": job.request_id,
                "api_key": job.api_key,
                "at": time.time(),
                "action": plan.action,
                "device": place if plan.device == device_kind(place) else plan.device,
                "batch_size": plan.shape.batch_size,
                "beam_size": plan.shape.beam_size,
                "word_timestamps": plan.shape.word_timestamps,
                "chunk_length": plan.shape.chunk_length,
                "estimate_bytes": plan.estimate.device_bytes,
                "budget_bytes": plan.budget,
                "waited_s": round(waited, 3),
                "degradations": [d.kind for d in plan.degradations],
                "model": job.source.id,
                "task": job.task,
                "audio_seconds": round(audio_seconds, 3),
                "reasons": [d.reason for d in plan.degradations],
                "reason": plan.reason,
                # Filled in when the request ends (see finish); present from the start so
                # that a reader serializing the dict never sees its size change.
                "outcome": None,
            }
        )
        if self.on_plan is not None:
            self.on_plan(plan)

    def finish(self, request_id: str, outcome: str) -> None:
        """Write how the request ended on its recent decisions that have no outcome yet:
        ``ok``, the error's code, or ``replanned`` for a plan dropped before it ran (made
        before the audio's length was known)."""
        for decision in list(self.stats.recent):  # a copy: other threads append meanwhile
            if decision["request_id"] == request_id and decision["outcome"] is None:
                decision["outcome"] = outcome


def model_status(model: LoadedModel, ttl: float) -> dict[str, Any]:
    """One loaded model: where, how big, whether in use, and when it would be unloaded
    (``ttl``: WHISPER_MODEL_TTL)."""
    idle = 0.0 if model.in_use else time.monotonic() - model.last_used
    unloads_in = None
    if not model.pinned and not model.in_use and ttl >= 0:
        unloads_in = round(max(0.0, ttl - idle), 1)
    return {
        "id": model.source.id,
        "device": model.device,
        "compute_type": model.compute_type,
        "weights_bytes": model.weights_bytes,
        "cost_source": "profile" if model.cost.profile is not None else "model",
        "loaded_at": int(model.loaded_at),
        "in_use": model.in_use,
        "pinned": model.pinned,
        "idle_s": round(idle, 1),
        "unloads_in_s": unloads_in,
    }


def memory_report(engine: Engine, in_flight: int) -> dict[str, Any]:
    """Devices, resident models, reservations and recent decisions (``GET /v1/memory``).

    Args:
        engine: The engine reported on.
        in_flight: Requests admitted now (the admission queue's depth, the serving side's).
    """
    gate, models, stats, s = engine.gate, engine.models, engine.stats, engine.settings
    schedulers = models.scheduler_stats()
    devices: list[dict[str, Any]] = []
    for place in dict.fromkeys([*engine.places, "cpu"]):
        try:
            snap = gate.probe(place).snapshot()
        except Exception as exc:  # a probe must never take the endpoint down
            devices.append({"device": place, "error": str(exc)})
            continue
        d = snap.device
        reserved = gate.reserved_bytes(place)
        resident = models.resident_bytes(place)
        # What this process is known to hold there: on the host its resident memory (which
        # contains its models); on a GPU its weights and what its requests reserved (NVML
        # cannot attribute memory to a process inside a container).
        ours = gate.footprint() if place == "cpu" else resident + reserved
        devices.append(
            {
                "device": place,
                "index": d.index,
                "name": d.name,
                "uuid": d.uuid,
                "total_bytes": d.total,
                "free_bytes": d.free,
                "used_bytes": d.used,
                "reserved_bytes": reserved,
                "resident_bytes": resident,
                "others_bytes": max(0, d.used - ours),
            }
        )
    return {
        "device": engine.device,
        "places": engine.places,
        "device_reason": engine.device_reason,
        "devices": devices,
        "requests": {
            "in_flight": in_flight,
            "max_queue": s.max_queue,
            "running": stats.running,
            "waiting_for_memory": stats.waiting_for_memory,
            "queued_windows": sum(st.queued_windows for st in schedulers),
        },
        "scheduling": {
            "order": [c.label for c in WorkClass],
            "starvation_s": s.batch_starvation_s,
            "starvation_batches": s.batch_starvation_batches,
            "batch_workers": s.batch_workers_on(engine.device),
            "held_for_live_s": round(sum(st.held_seconds for st in schedulers), 3),
            "classes": _classes(schedulers),
        },
        "models": [model_status(m, s.model_ttl) for m in models.pool.loaded()],
        "model_ttl_s": s.model_ttl,
        "reservations": gate.reservations.snapshot(),
        "idle_host_bytes": gate.idle_host_bytes,
        "policy": {
            "mode": s.memory_policy,
            "ladder": [str(step) for step in s.degrade_ladder],
            "gpu_memory_limit": str(s.gpu_memory_limit) if s.gpu_memory_limit else None,
            "gpu_headroom": str(s.gpu_headroom),
            "host_memory_limit": str(s.host_memory_limit) if s.host_memory_limit else None,
            "host_headroom": str(s.host_headroom),
            "max_wait_s": s.max_memory_wait,
            "cpu_fallback": s.cpu_fallback,
        },
        "counters": {
            "degradations": dict(stats.degradations),
            "oom_recoveries": stats.oom_recoveries,
            "unloads": stats.unloads,
            "rejected": stats.rejected,
            "waits": stats.waits,
        },
        "recent_decisions": list(stats.recent),
    }


def _classes(schedulers: list[SchedulerStats]) -> dict[str, dict[str, Any]]:
    """Each class's queue and waits, over every model's scheduler."""
    classes: dict[str, dict[str, Any]] = {}
    for c in WorkClass:
        each = [st.classes[c.label] for st in schedulers]
        waited = sum(x.waited for x in each)
        classes[c.label] = {
            "queued_windows": sum(x.queued_windows for x in each),
            "running_inline": sum(x.inline for x in each),
            "waited_windows": waited,
            "mean_wait_s": round(sum(x.wait_seconds for x in each) / waited, 3) if waited else 0.0,
            "max_wait_s": round(max((x.max_wait_seconds for x in each), default=0.0), 3),
        }
    return classes


__all__ = ["Decisions", "EngineStats", "memory_report", "model_status"]
