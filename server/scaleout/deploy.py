"""Building the Serve application and running it: ``python -m server ray`` and ``serve run``.

The application is two deployments: ``WhisperIngress`` (CPU, no model) takes HTTP and forwards
to ``WhisperReplica``, one engine per GPU (``num_gpus=1``; CPU slots with ``device="cpu"``, or
with ``auto`` on a cluster without GPUs), whose handle routes with
:class:`~server.scaleout.router.MemoryAwareRouter`. Replicas get the
``WHISPER_*`` variables of the process that deploys them, so one environment configures the
whole cluster.

``serve run deploy/serve_config.yaml`` uses :func:`app_builder` with the config's ``args``; the
config's ``deployments`` section may override any option set here (replicas, autoscaling,
routing stats period).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import ray
from ray import serve

from server.scaleout.ingress import WhisperIngress
from server.scaleout.placement import (
    PLACEMENT_TIMEOUT_S,
    PlacementError,
    choose_device,
    replica_demand,
    wait_until_running,
)
from server.scaleout.replica import WhisperReplica

logger = logging.getLogger(__name__)

APP_NAME = "whisper"
REPLICA_DEPLOYMENT = "WhisperReplica"
INGRESS_DEPLOYMENT = "WhisperIngress"
#: CPUs the ingress reserves: none, as Serve's own proxy. It holds no model and only waits on
#: replicas; a reserved slice kept `--replicas N` CPU replicas from fitting an N-CPU node.
INGRESS_CPUS = 0.0
ROUTERS = {
    "memory": "server.scaleout.router:MemoryAwareRouter",
    # Serve's default: two replicas at random, the shorter queue (for comparison).
    "default": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}


@dataclass(frozen=True)
class ScaleOut:
    """How the application is laid out on the cluster.

    Attributes:
        replicas: Replicas of the engine (one per GPU); with ``autoscale``, the initial count.
        device: ``cuda``: each replica takes one GPU. ``cpu``: replicas take CPU slots only.
            ``auto``: ``cuda`` where the cluster has a GPU when the application is built,
            else ``cpu`` (logged). On a cluster whose GPU nodes start on demand, name ``cuda``.
        cpus_per_replica: Ray CPUs each replica reserves (its decoding threads on the CPU).
        max_ongoing_requests: Requests one replica runs or queues at once; more wait in the
            router (for a replica that fits them) rather than in the replica.
        router: ``memory`` (by free memory) or ``default`` (Serve's power of two choices).
        stats_period_s: How often each replica reports its free memory and queue.
        autoscale: ``(min, max)`` replicas to scale between on queue depth, or None.
        target_ongoing_requests: The queue depth per replica autoscaling aims at.
        settings: Settings overrides for every replica (field names: ``{"model": ...}``).
        by_rank: Further overrides per replica rank.
        env: Environment variables for the replicas (``WHISPER_*`` and the like).
    """

    replicas: int = 1
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 8
    router: Literal["memory", "default"] = "memory"
    stats_period_s: float = 1.0
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float = 2.0
    settings: Mapping[str, Any] = field(default_factory=dict)
    by_rank: tuple[Mapping[str, Any], ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def initial_replicas(self) -> int:
        """Replicas started at first: ``replicas``, within ``autoscale``'s bounds if any."""
        if self.autoscale is None:
            return self.replicas
        low, high = self.autoscale
        return max(low, min(self.replicas, high))


def whisper_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``WHISPER_*`` variables of this process, for the replicas."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith("WHISPER_")}


def resolve_device(options: ScaleOut) -> ScaleOut:
    """``options`` with ``device`` ``auto`` made ``cuda`` or ``cpu`` from the cluster's
    resources (Ray must be connected), and the choice logged; other devices as they are."""
    if options.device != "auto":
        return options
    device, why = choose_device(options.device, ray.cluster_resources())
    logger.info("%s", why)
    return replace(options, device=device)


def build(options: ScaleOut) -> serve.Application:
    """The Serve application for ``options`` (``device`` ``auto`` is resolved on the cluster
    Ray is connected to)."""
    options = resolve_device(options)
    settings = {"device": options.device, **options.settings}
    demand = replica_demand(options.device, options.cpus_per_replica)
    actor: dict[str, Any] = {"num_cpus": demand["CPU"], "num_gpus": demand.get("GPU", 0)}
    if options.env:
        actor["runtime_env"] = {"env_vars": dict(options.env)}
    autoscaling: dict[str, Any] | None = None
    if options.autoscale is not None:
        low, high = options.autoscale
        autoscaling = {
            "min_replicas": low,
            "initial_replicas": options.initial_replicas(),
            "max_replicas": high,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        num_replicas=None if autoscaling else options.replicas,
        autoscaling_config=autoscaling,
        ray_actor_options=actor,
        max_ongoing_requests=options.max_ongoing_requests,
        # Loading a large model onto a GPU can take minutes.
        health_check_timeout_s=120,
        request_router_config={
            "request_router_class": ROUTERS[options.router],
            "request_routing_stats_period_s": options.stats_period_s,
            "request_routing_stats_timeout_s": max(options.stats_period_s * 5, 5.0),
        },
    )(WhisperReplica)
    ingress_actor: dict[str, Any] = {"num_cpus": INGRESS_CPUS}
    if "runtime_env" in actor:
        ingress_actor["runtime_env"] = actor["runtime_env"]
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        ray_actor_options=ingress_actor,
        # The ingress only waits on replicas; the replicas' limits bound the work.
        max_ongoing_requests=1000,
    )(WhisperIngress)
    upload_limit = str(
        settings.get("max_upload_size") or options.env.get("WHISPER_MAX_UPLOAD_SIZE") or "512MiB"
    )
    return ingress.bind(replica.bind(settings, list(options.by_rank)), max_upload_size=upload_limit)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``serve run``'s entry point: ``import_path: server.scaleout.deploy:app_builder`` with
    ``args`` of :class:`ScaleOut`'s fields (``replicas``, ``device``, ``settings``, ...)."""
    args = dict(args)
    if "autoscale" in args and args["autoscale"] is not None:
        args["autoscale"] = tuple(args["autoscale"])
    if "by_rank" in args:
        args["by_rank"] = tuple(args["by_rank"])
    args.setdefault("env", whisper_env())
    return build(ScaleOut(**args))


def start(
    options: ScaleOut,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
) -> ScaleOut:
    """Connect to the cluster (``RAY_ADDRESS``) or start a local one, deploy, and wait until
    the application runs.

    Returns:
        The options deployed (``device`` resolved).

    Raises:
        PlacementError: A replica was not placed within ``placement_timeout_s`` (the message
            names the missing resource; on a cluster this did not start, the application is
            deleted so the cluster stops asking for it), or the application failed to deploy.
    """
    env = dict(options.env)
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        # A local cluster's workers must import this package from where it is now.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    else:
        ray.init()
    options = resolve_device(replace(options, env=env))
    serve.start(http_options={"host": host, "port": port})
    # Not serve.run: it waits, without a bound, for replicas the cluster may never place.
    serve.run_many(
        [serve.RunTarget(build(options), name=APP_NAME, route_prefix="/")],
        wait_for_applications_running=False,
    )
    try:
        wait_until_running(
            APP_NAME,
            expected={INGRESS_DEPLOYMENT: 1, REPLICA_DEPLOYMENT: options.initial_replicas()},
            demand={
                INGRESS_DEPLOYMENT: {"CPU": INGRESS_CPUS},
                REPLICA_DEPLOYMENT: replica_demand(options.device, options.cpus_per_replica),
            },
            placement_timeout_s=placement_timeout_s,
        )
    except PlacementError:
        if not local:  # a local cluster ends with this process (ray.shutdown)
            serve.delete(APP_NAME)
        raise
    return options


def main(args: Any) -> None:
    """``python -m server ray``: deploy, then wait until interrupted."""
    options = ScaleOut(
        replicas=args.replicas,
        device=args.device,
        cpus_per_replica=args.cpus_per_replica,
        router=args.router,
        autoscale=tuple(args.autoscale) if args.autoscale else None,
        target_ongoing_requests=args.target_ongoing_requests,
        env=whisper_env(),
    )
    try:
        options = start(
            options,
            host=args.host,
            port=args.port,
            num_cpus=args.num_cpus,
            placement_timeout_s=args.placement_timeout,
        )
    except PlacementError as exc:
        ray.shutdown()  # a local cluster started here goes with it
        sys.exit(f"python -m server ray: {exc}")
    print(
        f"serving on http://{args.host}:{args.port} with {options.replicas} replica(s) "
        f"({options.device}); Ctrl-C stops",
        file=sys.stderr,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


__all__ = [
    "APP_NAME",
    "INGRESS_DEPLOYMENT",
    "REPLICA_DEPLOYMENT",
    "ScaleOut",
    "app_builder",
    "build",
    "main",
    "resolve_device",
    "start",
    "whisper_env",
]
