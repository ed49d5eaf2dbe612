"""Which device the replicas ask for, and waiting (bounded) until the cluster has placed them.

A Ray actor that asks for a resource no node has is not an error to Ray: it waits, in case an
autoscaler adds a node, and the autoscaler logs that it cannot, for ever. So ``python -m server
ray`` asks for a GPU only where the cluster has one (``--device auto``), and gives the cluster
a bounded time to start every replica: past it, the command stops with a message that names
the resource that is missing, rather than leave a server that never becomes ready.

"Placed" is Ray's word for an actor that got its resources and a worker process; a placed
replica may still be loading its model (no bound: a large model on a GPU takes minutes, and a
replica that fails to load is Serve's to restart or report).

Ray is imported where it is used: the rest (the choice, the message) is pure, imported by the
CLI without the extra and tested without a cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

#: Seconds ``python -m server ray`` gives the cluster to place every replica (--placement-timeout):
#: on a cluster with room it takes seconds; an autoscaler that starts nodes may need longer.
PLACEMENT_TIMEOUT_S = 120.0

Device = Literal["cuda", "cpu"]


def choose_device(requested: str, cluster: Mapping[str, float]) -> tuple[Device, str]:
    """The device the replicas ask for, and why (to print).

    Args:
        requested: ``auto``, ``cuda`` or ``cpu``.
        cluster: The cluster's resources (``ray.cluster_resources()``).

    Returns:
        ``cuda`` (one GPU per replica) or ``cpu``, and a sentence saying why.

    Raises:
        ValueError: ``requested`` is none of the three.
    """
    gpus = cluster.get("GPU", 0)
    if requested == "cuda":
        return "cuda", f"--device cuda: one GPU per replica (the cluster has GPU: {gpus:g})"
    if requested == "cpu":
        return "cpu", "--device cpu: replicas on CPUs"
    if requested != "auto":
        raise ValueError(f"device must be auto, cuda or cpu, not {requested!r}")
    if gpus >= 1:
        return "cuda", f"--device auto: the cluster has GPU: {gpus:g}, one GPU per replica"
    none = "no GPU" if gpus == 0 else "less than one GPU"  # a fraction does not hold a replica
    return "cpu", (
        f"--device auto: the cluster has {none} (GPU: {gpus:g}), replicas on CPUs; "
        "--device cuda waits for GPU nodes instead"
    )


def replica_demand(device: str, cpus: float) -> dict[str, float]:
    """What one engine replica asks Ray for (its ``ray_actor_options``)."""
    demand = {"CPU": cpus}
    if device == "cuda":
        demand["GPU"] = 1.0
    return demand


def shortfall_message(
    deployment: str,
    demand: Mapping[str, float],
    unplaced: int,
    asked: int,
    waited_s: float,
    total: Mapping[str, float],
    free: Mapping[str, float],
) -> str:
    """Why replicas were not placed: each resource a replica needs and the cluster lacks.

    Args:
        deployment: Whose replicas.
        demand: What one replica needs (:func:`replica_demand`).
        unplaced: Replicas still waiting for resources.
        asked: Replicas asked for.
        waited_s: How long they were given.
        total: The cluster's resources (``ray.cluster_resources()``).
        free: What is free now (``ray.available_resources()``), after the replicas placed.

    Returns:
        One line for the operator, naming the missing resource with both figures.
    """
    short = [name for name, need in demand.items() if free.get(name, 0) < need]
    # What the cluster lacks in all before what others hold now.
    short.sort(key=lambda name: total.get(name, 0) >= demand[name])
    missing = [
        f"needs {name}: {demand[name]:g} per replica; the cluster has {name}: "
        f"{total.get(name, 0):g} ({free.get(name, 0):g} free)"
        for name in short
    ]
    if not missing and demand:  # enough of each in all, but not together on one node
        wants = ", ".join(f"{name}: {need:g}" for name, need in demand.items())
        missing = [f"needs {wants} on one node; no node has that free (see `ray status`)"]
    elif not missing:
        missing = ["Ray has not started a worker for them (see `ray status`)"]
    return (
        f"{unplaced} of {asked} replicas of {deployment} could not be placed within "
        f"{waited_s:g} s: "
        + "; ".join(missing)
        + ". Ask for fewer (--replicas, --cpus-per-replica), serve on the CPU (--device cpu), "
        "add nodes, or give an autoscaler longer (--placement-timeout)."
    )


class PlacementError(RuntimeError):
    """Replicas could not be placed in time, or the application failed to deploy."""


@dataclass
class _Actors:
    """The application's replica actors and whether each has started, polled without blocking."""

    prefix: str
    ready: dict[str, Any] = field(default_factory=dict)  # actor name -> its __ray_ready__ ref

    def placed(self, deployment: str) -> int:
        """Replicas of ``deployment`` that Ray has placed."""
        import ray

        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if name.startswith(self.prefix) and name not in self.ready:
                # An actor Ray has not placed yet runs this once it has: one call per actor.
                actor = ray.get_actor(name, namespace=entry["namespace"])
                self.ready[name] = actor.__ray_ready__.remote()
        mine = [ref for name, ref in self.ready.items() if f"#{deployment}#" in name]
        done, _ = ray.wait(mine, num_returns=len(mine), timeout=0) if mine else ([], [])
        return len(done)


def wait_until_running(
    app: str,
    expected: Mapping[str, int],
    demand: Mapping[str, Mapping[str, float]],
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    *,
    poll_s: float = 0.5,
) -> None:
    """Wait until ``app`` is running: its replicas placed within ``placement_timeout_s``, then
    loaded (unbounded: Serve reports a replica that fails).

    Args:
        app: The Serve application's name.
        expected: Replicas asked for, by deployment name.
        demand: What one replica of each deployment asks Ray for.
        placement_timeout_s: How long the cluster gets to place them all.
        poll_s: How often to look.

    Raises:
        PlacementError: Some replica was not placed in time (the message names the resource
            that is missing), or Serve reports the application failed to deploy.
    """
    import ray
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    actors = _Actors(prefix=f"SERVE_REPLICA::{app}#")
    start = time.monotonic()
    placed_all = False
    while True:
        status = serve.status().applications.get(app)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise PlacementError(f"the application failed to deploy: {status.message}")
        if not placed_all:
            counts = {name: actors.placed(name) for name in expected}
            placed_all = all(counts[name] >= n for name, n in expected.items())
            if placed_all:
                logger.info("all replicas placed; waiting for them to load the model")
            elif time.monotonic() - start > placement_timeout_s:
                name = next(n for n, want in expected.items() if counts[n] < want)
                raise PlacementError(
                    shortfall_message(
                        name,
                        demand[name],
                        expected[name] - counts[name],
                        expected[name],
                        placement_timeout_s,
                        ray.cluster_resources(),
                        ray.available_resources(),
                    )
                )
        time.sleep(poll_s)


__all__ = [
    "PLACEMENT_TIMEOUT_S",
    "PlacementError",
    "choose_device",
    "replica_demand",
    "shortfall_message",
    "wait_until_running",
]
