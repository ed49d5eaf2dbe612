"""The reservation ledger."""

from __future__ import annotations

import threading
import time

import pytest

from server.memory import Reservations


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reserve_total_and_release() -> None:
    ledger = Reservations()
    a = ledger.reserve("cuda", 100, owner="a")
    ledger.reserve("cuda", 50, owner="b")
    ledger.reserve("cpu", 7, owner="c")
    assert (ledger.total("cuda"), ledger.total("cpu"), ledger.total("cuda:1")) == (150, 7, 0)
    a.release()
    a.release()  # idempotent
    assert a.released and ledger.total("cuda") == 50


def test_a_reservation_is_released_when_its_block_fails() -> None:
    ledger = Reservations()
    with pytest.raises(RuntimeError), ledger.reserve("cuda", 10, owner="a") as held:
        assert ledger.total("cuda") == 10
        raise RuntimeError("CUDA failed with error out of memory")
    assert held.released and ledger.total("cuda") == 0


def test_snapshot_lists_owners_oldest_first() -> None:
    clock = FakeClock()
    ledger = Reservations(clock=clock)
    ledger.reserve("cuda", 1, owner="first")
    clock.now += 2.5
    ledger.reserve("cpu", 2, owner="second", api_key="key-1")
    clock.now += 0.5
    assert ledger.snapshot() == [
        {"device": "cuda", "owner": "first", "api_key": None, "bytes": 1, "age_s": 3.0},
        {"device": "cpu", "owner": "second", "api_key": "key-1", "bytes": 2, "age_s": 0.5},
    ]


def test_negative_reservations_are_refused() -> None:
    with pytest.raises(ValueError):
        Reservations().reserve("cuda", -1, owner="x")


def test_wait_for_release_wakes_on_release() -> None:
    ledger = Reservations()
    held = ledger.reserve("cuda", 10, owner="a")
    waiting = threading.Event()
    woke: list[bool] = []

    def waiter() -> None:
        waiting.set()
        woke.append(ledger.wait_for_release(timeout=5))

    thread = threading.Thread(target=waiter)
    thread.start()
    waiting.wait()
    started = time.monotonic()
    time.sleep(0.01)
    held.release()
    thread.join()
    assert woke == [True] and time.monotonic() - started < 4


def test_wait_for_release_times_out() -> None:
    assert Reservations().wait_for_release(timeout=0.01) is False


def test_a_release_between_reading_and_waiting_is_not_missed() -> None:
    ledger = Reservations()
    held = ledger.reserve("cuda", 10, owner="a")
    seen = ledger.generation
    held.release()
    assert ledger.wait_for_release(timeout=0, since=seen) is True


def test_planning_makes_plan_and_reserve_one_step() -> None:
    ledger = Reservations()
    totals: list[int] = []

    def admit(owner: str) -> None:
        with ledger.planning() as held:
            reserved = held.total("cuda")
            time.sleep(0.005)  # another thread planning now would see the same total
            totals.append(reserved)
            ledger.reserve("cuda", 10, owner=owner)

    threads = [threading.Thread(target=admit, args=(str(i),)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(totals) == [0, 10, 20, 30, 40]
