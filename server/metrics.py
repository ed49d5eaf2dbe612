"""Prometheus metrics (``GET /metrics``).

Request counters are recorded as requests finish; engine state (queue depth, degradations, OOM
recoveries, batch sizes) and device memory (NVML or host RAM) are read at scrape time by a
collector, so nothing is sampled in the background. Each app has its own registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.batching.policy import WAIT_BUCKETS, WorkClass

if TYPE_CHECKING:
    from server.admission import Admission
    from server.batching.scheduler import SchedulerStats
    from server.engine.core import Engine

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector(Collector):
    """Reads the engine's counters and the memory probes when Prometheus scrapes."""

    def __init__(self, engine: Engine, admission: Admission) -> None:
        self.engine = engine
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        stats = engine.stats
        queue = GaugeMetricFamily(
            "whisper_queue_depth", "Requests admitted: running or waiting for a worker."
        )
        queue.add_metric([], self.admission.depth)
        yield queue
        degradations = CounterMetricFamily(
            "whisper_degradations", "Plan changes made to fit memory, by kind.", labels=["kind"]
        )
        for kind, count in sorted(stats.degradations.items()):
            degradations.add_metric([kind], count)
        yield degradations
        oom = CounterMetricFamily(
            "whisper_oom_recoveries", "Out-of-memory errors caught and retried."
        )
        oom.add_metric([], stats.oom_recoveries)
        yield oom
        rejected = CounterMetricFamily(
            "whisper_memory_rejections", "Requests refused with 503 for lack of memory."
        )
        rejected.add_metric([], stats.rejected)
        yield rejected
        batches = CounterMetricFamily(
            "whisper_scheduler_batches", "Batches the cross-request scheduler ran."
        )
        mixed = CounterMetricFamily(
            "whisper_scheduler_mixed_batches", "Batches that held windows of several requests."
        )
        windows = CounterMetricFamily(
            "whisper_scheduler_windows", "30 s windows decoded by the scheduler."
        )
        queued = GaugeMetricFamily(
            "whisper_scheduler_queued_windows", "Windows waiting for a batch."
        )
        scheduler_stats = engine.models.scheduler_stats()
        batches.add_metric([], sum(st.batches for st in scheduler_stats))
        mixed.add_metric([], sum(st.mixed_batches for st in scheduler_stats))
        windows.add_metric([], sum(st.windows for st in scheduler_stats))
        queued.add_metric([], sum(st.queued_windows for st in scheduler_stats))
        yield from (batches, mixed, windows, queued)
        yield from _classes(scheduler_stats)
        ready = GaugeMetricFamily("whisper_ready", "1 when the model is loaded.")
        ready.add_metric([], 1.0 if engine.ready else 0.0)
        yield ready

        free = GaugeMetricFamily(
            "whisper_memory_free_bytes", "Free memory per device.", labels=["device", "name"]
        )
        used = GaugeMetricFamily(
            "whisper_memory_used_bytes", "Used memory per device.", labels=["device", "name"]
        )
        total = GaugeMetricFamily(
            "whisper_memory_total_bytes", "Total memory per device.", labels=["device", "name"]
        )
        reserved = GaugeMetricFamily(
            "whisper_memory_reserved_bytes",
            "Memory reserved by running requests.",
            labels=["device"],
        )
        for device in dict.fromkeys([*engine.places, "cpu"]):
            try:
                memory = engine.gate.probe(device).snapshot().device
            except Exception:  # a failing probe must not break the scrape
                logger.debug("memory probe for %s failed", device, exc_info=True)
                continue
            label = device if ":" in device else f"{device}:{memory.index}"
            free.add_metric([label, memory.name], memory.free)
            used.add_metric([label, memory.name], memory.used)
            total.add_metric([label, memory.name], memory.total)
            reserved.add_metric([device], engine.gate.reserved_bytes(device))
        yield from (free, used, total, reserved)


def _classes(scheduler_stats: list[SchedulerStats]) -> Iterator[Metric]:
    """Per class of work (the scheduling policy's): windows queued now, and how long the
    windows taken from the queue waited."""
    depth = GaugeMetricFamily(
        "whisper_scheduler_class_queued_windows",
        "Windows waiting for a batch, by class of work (live_final, live_interim, short, long).",
        labels=["class"],
    )
    inline = GaugeMetricFamily(
        "whisper_scheduler_class_inline_decodes",
        "Decodes running outside the queue in their callers' threads, by class of work.",
        labels=["class"],
    )
    wait = HistogramMetricFamily(
        "whisper_scheduler_class_wait_seconds",
        "Seconds a window waited in the queue before its batch, by class of work.",
        labels=["class"],
    )
    for c in WorkClass:
        each = [st.classes[c.label] for st in scheduler_stats]
        depth.add_metric([c.label], sum(x.queued_windows for x in each))
        inline.add_metric([c.label], sum(x.inline for x in each))
        counts = [sum(x.buckets[i] for x in each) for i in range(len(WAIT_BUCKETS))]
        waited = sum(x.waited for x in each)
        buckets = [(str(b), n) for b, n in zip(WAIT_BUCKETS, counts, strict=True)]
        wait.add_metric([c.label], [*buckets, ("+Inf", waited)], sum(x.wait_seconds for x in each))
    held = CounterMetricFamily(
        "whisper_scheduler_held_for_live_seconds",
        "Seconds the scheduler held back batches for live decodes running outside the queue.",
    )
    held.add_metric([], sum(st.held_seconds for st in scheduler_stats))
    yield from (depth, inline, wait, held)


class Metrics:
    """The app's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, engine: Engine, admission: Admission) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "whisper_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.transcriptions = Counter(
            "whisper_transcriptions",
            "Finished transcriptions and translations by task, response format and outcome.",
            ["task", "format", "outcome"],
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "whisper_audio_seconds", "Seconds of audio transcribed.", registry=self.registry
        )
        self.latency = Histogram(
            "whisper_request_seconds",
            "Request latency by route.",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=self.registry,
        )
        self.rtf = Histogram(
            "whisper_real_time_factor",
            "Processing seconds per second of audio (lower is faster).",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "whisper_batch_size",
            "Windows decoded together, per planned piece.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.realtime_sessions = Gauge(
            "whisper_realtime_sessions_active",
            "Live transcription sessions open now.",
            registry=self.registry,
        )
        self.realtime_sessions_total = Counter(
            "whisper_realtime_sessions_ended",
            "Live transcription sessions ended, by how they ended.",
            ["outcome"],
            registry=self.registry,
        )
        self.realtime_audio_seconds = Counter(
            "whisper_realtime_audio_seconds",
            "Seconds of audio received by live sessions.",
            registry=self.registry,
        )
        self.realtime_completion_seconds = Histogram(
            "whisper_realtime_completion_seconds",
            "Seconds from the end of an utterance (speech stopped, or the commit) to its "
            "completed transcript.",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
            registry=self.registry,
        )
        self.realtime_first_delta_seconds = Histogram(
            "whisper_realtime_first_delta_seconds",
            "Seconds from the start of an utterance to its first delta.",
            buckets=(0.5, 1, 1.5, 2, 3, 5, 10, 30),
            registry=self.registry,
        )
        self.registry.register(EngineCollector(engine, admission))

    def render(self) -> bytes:
        return generate_latest(self.registry)
