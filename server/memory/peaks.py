"""Peak memory while a block runs, sampled from a thread: for calibration and the benches.

The server itself never samples peaks; it plans from estimates. These helpers measure what the
estimates are checked against.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from server.memory.probes import MemoryProbe, ProbeUnavailable


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
