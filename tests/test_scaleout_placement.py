"""The device replicas ask for and the message when they cannot be placed
(server/scaleout/placement.py): pure functions, tested from tables. The command itself, on a
real local cluster, is in tests/test_ray.py."""

from __future__ import annotations

import pytest

from server.scaleout.placement import choose_device, replica_demand, shortfall_message


@pytest.mark.parametrize(
    ("requested", "cluster", "device", "said"),
    [
        ("auto", {"CPU": 2.0}, "cpu", "no GPU (GPU: 0), replicas on CPUs"),
        ("auto", {"CPU": 2.0, "GPU": 0.0}, "cpu", "no GPU"),
        ("auto", {"CPU": 16.0, "GPU": 2.0}, "cuda", "GPU: 2, one GPU per replica"),
        # A fraction of a GPU (a shared card) is not one for a replica.
        ("auto", {"CPU": 16.0, "GPU": 0.5}, "cpu", "less than one GPU (GPU: 0.5)"),
        ("cuda", {"CPU": 2.0}, "cuda", "GPU: 0"),
        ("cpu", {"CPU": 16.0, "GPU": 8.0}, "cpu", "--device cpu"),
    ],
)
def test_choose_device(requested: str, cluster: dict[str, float], device: str, said: str) -> None:
    chosen, why = choose_device(requested, cluster)
    assert chosen == device
    assert said in why


def test_choose_device_rejects_other_names() -> None:
    with pytest.raises(ValueError, match="auto, cuda or cpu"):
        choose_device("gpu", {})


def test_replica_demand() -> None:
    assert replica_demand("cuda", 1.0) == {"CPU": 1.0, "GPU": 1.0}
    assert replica_demand("cpu", 0.5) == {"CPU": 0.5}


def test_shortfall_names_the_missing_resource() -> None:
    message = shortfall_message(
        "R", {"CPU": 1.0, "GPU": 1.0}, 2, 2, 120, {"CPU": 8.0}, {"CPU": 7.9}
    )
    assert message.startswith("2 of 2 replicas of R could not be placed within 120 s: ")
    assert "needs GPU: 1 per replica; the cluster has GPU: 0 (0 free)" in message
    assert "CPU" not in message.split("Ask for")[0].split(": ", 1)[1]
    assert "--device cpu" in message and "--placement-timeout" in message


def test_shortfall_lists_what_is_lacking_in_all_first() -> None:
    # One CPU in all, the ingress holds a tenth: the CPU is short too, but the GPU never fits.
    message = shortfall_message("R", {"CPU": 1.0, "GPU": 1.0}, 1, 1, 5, {"CPU": 1.0}, {"CPU": 0.9})
    gpu, cpu = message.index("GPU: 1 per replica"), message.index("CPU: 1 per replica")
    assert gpu < cpu
    assert "the cluster has CPU: 1 (0.9 free)" in message


def test_shortfall_when_placed_replicas_hold_the_rest() -> None:
    message = shortfall_message("R", {"CPU": 4.0}, 1, 3, 60, {"CPU": 8.0}, {"CPU": 0.0})
    assert message.startswith("1 of 3 replicas of R")
    assert "needs CPU: 4 per replica; the cluster has CPU: 8 (0 free)" in message


def test_shortfall_when_the_room_is_split_over_nodes() -> None:
    message = shortfall_message(
        "R", {"CPU": 4.0, "GPU": 1.0}, 1, 1, 60, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 6.0, "GPU": 1.0}
    )
    assert "needs CPU: 4, GPU: 1 on one node" in message


def test_shortfall_of_a_deployment_that_asks_for_nothing() -> None:
    message = shortfall_message("Ingress", {}, 1, 1, 60, {"CPU": 8.0}, {"CPU": 0.0})
    assert "1 of 1 replicas of Ingress" in message and "not started a worker" in message
