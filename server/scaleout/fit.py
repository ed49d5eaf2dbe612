"""Which replica should take a request: a pure function of what the replicas last reported.

Each replica reports (through Serve's routing stats) the memory its own planner sees free on
its serving device and what requests cost there, as a curve of bytes against seconds of audio
computed by its cost model. The router knows only the upload's size; it turns that into
seconds with a deliberately low bitrate (so it over-estimates), reads the request's need off
each replica's curve, and ranks the replicas the need fits, fewest requests in flight first.
Keeping this free of Ray makes every decision a table-driven unit test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Upload bytes per second of audio assumed when only the size is known: 128 kbit/s, the
#: lowest rate of common uploads (mp3, m4a). Lossless files (WAV is 32 kB/s at 16 kHz, FLAC of
#: 44.1 kHz stereo about 100 kB/s) are over-estimated, which only errs towards the roomier replica.
UPLOAD_BYTES_PER_SECOND = 16_000


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's last report (its ``record_routing_stats``).

    Attributes:
        budget_bytes: What its planner sees free now on its serving device (GPU memory, or host
            RAM when it serves on the CPU), after headroom, limits and the reservations of the
            requests it is running.
        queue: Requests it has admitted (running or waiting).
        need_curve: ``(seconds of audio, bytes)`` points, seconds ascending: what a request of
            that length needs on the serving device at the default options. Past the last point
            the need stays flat (long files are held one piece at a time).
        taken_at: ``time.time()`` on the replica when it was read.
        device: ``cuda`` or ``cpu``.
    """

    budget_bytes: int
    queue: int
    need_curve: tuple[tuple[float, int], ...]
    taken_at: float
    device: str = "cpu"

    def to_stats(self) -> dict[str, Any]:
        """The dict Serve carries from the replica to the routers."""
        return {
            "budget_bytes": self.budget_bytes,
            "queue": self.queue,
            "need_curve": [list(point) for point in self.need_curve],
            "taken_at": self.taken_at,
            "device": self.device,
        }

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> ReplicaLoad | None:
        """The report in ``stats``, or None when the replica has not reported (yet)."""
        if not stats or "budget_bytes" not in stats:
            return None
        return cls(
            budget_bytes=int(stats["budget_bytes"]),
            queue=int(stats.get("queue", 0)),
            need_curve=tuple((float(s), int(b)) for s, b in stats.get("need_curve", ())),
            taken_at=float(stats.get("taken_at", 0.0)),
            device=str(stats.get("device", "cpu")),
        )


def upload_seconds(upload_bytes: int, bytes_per_second: float = UPLOAD_BYTES_PER_SECOND) -> float:
    """Seconds of audio assumed for an upload of ``upload_bytes``."""
    return max(0.0, upload_bytes / bytes_per_second)


def need_bytes(load: ReplicaLoad, seconds: float) -> int:
    """What a request of ``seconds`` of audio needs on this replica: the first point of its
    curve at or past ``seconds``, or the last one."""
    if not load.need_curve:
        return 0
    for point_seconds, nbytes in load.need_curve:
        if seconds <= point_seconds:
            return nbytes
    return load.need_curve[-1][1]


@dataclass(frozen=True)
class Candidate:
    """A replica as the router sees it when a request arrives.

    Attributes:
        key: The router's handle on it.
        load: Its last report, or None if it has not reported.
        in_flight: Requests the router knows it is running now (Serve's own count, fresher
            than the report).
        routed_bytes: Needs of requests routed to it since its report was taken, which the
            report's budget does not show yet.
    """

    key: Any
    load: ReplicaLoad | None
    in_flight: int | None = None
    routed_bytes: int = 0

    def queue(self) -> int:
        if self.in_flight is not None:
            return self.in_flight
        return self.load.queue if self.load is not None else 0

    def room(self) -> int:
        assert self.load is not None
        return self.load.budget_bytes - self.routed_bytes


def rank_replicas(candidates: Sequence[Candidate], seconds: float) -> list[list[Any]]:
    """Replicas in the order to try them, one per rank (Serve tries rank after rank while the
    earlier ones are at their request limit).

    Replicas whose room fits the request come first, fewest requests in flight first, then the
    most room. Replicas that have not reported yet follow: nothing says they cannot take it.
    Replicas that reported too little room are left out while any other replica is there, so a
    request waits for room rather than land where its planner would degrade or refuse it; when
    none fits, every replica is ranked, most room first (the planner there decides).

    Args:
        candidates: The replicas.
        seconds: The request's assumed length (:func:`upload_seconds`).

    Returns:
        Ranks of one key each.
    """
    fits: list[Candidate] = []
    unknown: list[Candidate] = []
    short: list[Candidate] = []
    for c in candidates:
        if c.load is None:
            unknown.append(c)
        elif need_bytes(c.load, seconds) <= c.room():
            fits.append(c)
        else:
            short.append(c)
    fits.sort(key=lambda c: (c.queue(), -c.room()))
    unknown.sort(key=lambda c: c.queue())
    ordered = fits + unknown
    if not ordered:
        ordered = sorted(short, key=lambda c: (-c.room(), c.queue()))
    return [[c.key] for c in ordered]


__all__ = [
    "UPLOAD_BYTES_PER_SECOND",
    "Candidate",
    "ReplicaLoad",
    "need_bytes",
    "rank_replicas",
    "upload_seconds",
]
