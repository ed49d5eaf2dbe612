"""The router's ranking (server/scaleout/fit.py): a pure function, tested from tables."""

from __future__ import annotations

import pytest

from server.scaleout.fit import Candidate, ReplicaLoad, need_bytes, rank_replicas, upload_seconds

MiB = 1 << 20
CURVE = ((30.0, 100 * MiB), (300.0, 500 * MiB))


def load(budget_mib: int, queue: int = 0) -> ReplicaLoad:
    return ReplicaLoad(budget_bytes=budget_mib * MiB, queue=queue, need_curve=CURVE, taken_at=0)


@pytest.mark.parametrize(
    ("seconds", "need_mib"), [(0, 100), (30, 100), (31, 500), (300, 500), (9000, 500)]
)
def test_need_reads_the_curve(seconds: float, need_mib: int) -> None:
    assert need_bytes(load(0), seconds) == need_mib * MiB


def test_upload_seconds_assume_a_low_bitrate() -> None:
    assert upload_seconds(16_000) == 1.0
    assert upload_seconds(0) == 0.0


@pytest.mark.parametrize(
    ("candidates", "seconds", "order"),
    [
        # Both fit: fewer in flight first, then more room.
        ([Candidate("a", load(900), 1), Candidate("b", load(200), 0)], 10, ["b", "a"]),
        ([Candidate("a", load(300), 0), Candidate("b", load(900), 0)], 10, ["b", "a"]),
        # A long upload only where it fits, however short the other's queue.
        ([Candidate("big", load(900), 3), Candidate("low", load(200), 0)], 120, ["big"]),
        # Routed since the report counts against its budget.
        (
            [Candidate("a", load(900), 0, routed_bytes=600 * MiB), Candidate("b", load(600), 1)],
            120,
            ["b"],
        ),
        # Not reported yet: after those that fit, before those that do not.
        ([Candidate("new", None), Candidate("a", load(900), 2)], 120, ["a", "new"]),
        ([Candidate("new", None), Candidate("low", load(100))], 120, ["new"]),
        # None fits: all of them, most room first (their planners decide).
        ([Candidate("a", load(100)), Candidate("b", load(300))], 120, ["b", "a"]),
        # In-flight unknown: the report's queue.
        ([Candidate("a", load(900, queue=4)), Candidate("b", load(900, queue=1))], 10, ["b", "a"]),
    ],
)
def test_rank(candidates: list[Candidate], seconds: float, order: list[str]) -> None:
    assert rank_replicas(candidates, seconds) == [[key] for key in order]


def test_stats_round_trip() -> None:
    original = load(123, queue=2)
    assert ReplicaLoad.from_stats(original.to_stats()) == original
    assert ReplicaLoad.from_stats({}) is None
    assert ReplicaLoad.from_stats(None) is None
