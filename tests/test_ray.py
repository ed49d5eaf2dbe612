"""Scale-out on a real local Ray cluster: two CPU replicas of tiny.en behind the ingress.

One cluster serves the whole module (starting Ray and loading the replicas is most of the
time); the last test redeploys it with one replica given a low memory limit. The cluster is
started with 2 CPUs and no dashboard, and shut down at the end. The first tests run
``python -m server ray`` itself, in a subprocess that starts (and stops) a cluster of its own
where the replicas cannot be placed, so no model is loaded.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import threading
import time
import wave
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray  # the ray extra is part of '.[test]': a missing Ray fails here, it is not skipped
import requests
from openai import OpenAI
from ray import serve

from server.scaleout.deploy import APP_NAME, REPLICA_DEPLOYMENT, ScaleOut, build
from server.scaleout.fit import ReplicaLoad, need_bytes, upload_seconds
from server.scaleout.replica import REPLICA_HEADER
from tests.conftest import free_port

SHORT = "jfk.mp3"  # 66 kB, 11 s
LONG = "long.wav"  # written by `long_upload`: 9.6 MB, 5 min (a sentence, then silence)
STATS_PERIOD_S = 0.5  # how often the replicas report to the router

#: The replicas' resident memory when the module's cluster started, before any request: what a
#: freshly started replica holds (one that served requests at once holds more).
FRESH: dict[str, int] = {}


def _options(tiny_model: Path, models_dir: Path, **changes: Any) -> ScaleOut:
    base = ScaleOut(
        replicas=2,
        device="cpu",
        cpus_per_replica=0.5,
        max_ongoing_requests=8,  # ScaleOut's default: the router, not this cap, spreads load
        stats_period_s=STATS_PERIOD_S,
        settings={
            "model": str(tiny_model),
            "models_dir": str(models_dir),
            "cpu_threads": 1,
            "max_audio_duration": 7200,
            "log_level": "warning",
        },
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    return ScaleOut(**{**base.__dict__, **changes})


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster with the application deployed; yields the base URL."""
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        models = tmp_path_factory.mktemp("models")
        serve.run(build(_options(tiny_model, models)), name=APP_NAME, route_prefix="/")
        FRESH["rss"] = _replica_rss()
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _ray_command(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m server ray ARGS`` on a local cluster of its own, on a box without GPUs
    (CUDA_VISIBLE_DEVICES hides any this machine has)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-m", "server", "ray", "--port", str(free_port()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # the bound below is seconds; this only keeps a regression from hanging
    )


def test_cuda_replicas_on_a_cluster_without_gpus_exit_naming_the_gpu() -> None:
    done = _ray_command("--device", "cuda", "--num-cpus", "2", "--placement-timeout", "5")
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "1 of 1 replicas of WhisperReplica could not be placed within 5 s" in last, last
    assert "needs GPU: 1 per replica; the cluster has GPU: 0 (0 free)" in last, last


def test_auto_device_takes_cpus_and_names_cpus_it_lacks() -> None:
    # The default device on a cluster without GPUs is the CPU, said so; replicas that ask
    # for more CPUs than the cluster has are named the same way.
    done = _ray_command(
        "--replicas", "2", "--cpus-per-replica", "4", "--num-cpus", "2",
        "--placement-timeout", "5",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "--device auto: the cluster has no GPU (GPU: 0), replicas on CPUs" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "2 of 2 replicas of WhisperReplica could not be placed within 5 s" in last, last
    assert "needs CPU: 4 per replica; the cluster has CPU: 2" in last, last
    assert "GPU" not in last.split("Ask for")[0], last


def _post(url: str, name: str, data_dir: Path, **form: str) -> requests.Response:
    with open(data_dir / name, "rb") as fh:
        return requests.post(
            f"{url}/v1/audio/transcriptions",
            files={"file": (name, fh)},
            data={"model": "whisper-1", **form},
            timeout=300,
        )


def _replica_actors() -> dict[str, Any]:
    """The live replica actors of the engine deployment, by their ``x-whisper-replica`` name."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{REPLICA_DEPLOYMENT}#"
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            name = entry["name"].split("::", 1)[1]
            out[name] = ray.get_actor(entry["name"], namespace=entry["namespace"])
    return out


def test_equal_requests_at_once_spread_evenly(cluster: str, data_dir: Path) -> None:
    """8 equal requests at once on 2 idle replicas: 4 each, give or take one. The router counts
    a request against its replica from the moment it picks it (it sent 7 of 8 to one)."""
    # Serve pulls a replica's first routing report once the replica runs; until it reaches the
    # router, the router ranks that replica after those that reported, by design (it knows
    # nothing of its memory). A few periods later both have reported.
    time.sleep(10 * STATS_PERIOD_S)
    start = threading.Barrier(8)

    def one(_: int) -> requests.Response:
        start.wait()
        return _post(cluster, SHORT, data_dir)

    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    served_by = Counter(r.headers[REPLICA_HEADER] for r in responses)
    assert len(served_by) == 2 and all(3 <= n <= 5 for n in served_by.values()), served_by


def test_both_replicas_serve_under_concurrency(cluster: str, data_dir: Path) -> None:
    client = OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0, timeout=300)

    def one(_: int) -> tuple[str, str]:
        with open(data_dir / SHORT, "rb") as fh:
            raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=fh)
        return raw.headers[REPLICA_HEADER], raw.parse().text

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    served_by = Counter(replica for replica, _ in results)
    assert len(served_by) == 2, served_by
    assert all("ask not what your country" in text for _, text in results)


def test_streaming_through_the_ingress(cluster: str, data_dir: Path) -> None:
    with open(data_dir / SHORT, "rb") as fh:
        response = requests.post(
            f"{cluster}/v1/audio/transcriptions",
            files={"file": (SHORT, fh)},
            data={"model": "whisper-1", "stream": "true"},
            stream=True,
            timeout=300,
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers[REPLICA_HEADER]
    events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert b"transcript.text.delta" in events[0]
    assert b"transcript.text.done" in events[-1]


def test_errors_keep_openai_shape(cluster: str) -> None:
    response = requests.post(
        f"{cluster}/v1/audio/transcriptions", data={"model": "whisper-1"}, timeout=60
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"
    assert response.headers[REPLICA_HEADER]
    missing = requests.get(f"{cluster}/v1/nothing", timeout=60)
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_killed_replica_and_the_requests_after(cluster: str, data_dir: Path) -> None:
    with cf.ThreadPoolExecutor(4) as pool:
        during = [pool.submit(_post, cluster, SHORT, data_dir) for _ in range(4)]
        actors = _replica_actors()
        assert len(actors) == 2, actors
        victim = sorted(actors)[0]
        ray.kill(actors[victim], no_restart=True)
        for future in during:
            response = future.result()
            # A request on the victim when it died may fail; it fails as an OpenAI error.
            assert response.status_code in (200, 503), response.text
            if response.status_code != 200:
                assert response.json()["error"]["type"] == "server_error"
        after = list(pool.map(lambda _: _post(cluster, SHORT, data_dir), range(4)))
    assert [r.status_code for r in after] == [200] * 4, [r.text for r in after]
    assert all(r.headers[REPLICA_HEADER] != victim for r in after)


@pytest.fixture(scope="module")
def long_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/data plus a large upload that is quick to transcribe: the router sees only its
    size (5 minutes of 16 kHz WAV), the engine skips its silence."""
    folder = tmp_path_factory.mktemp("audio")
    shutil.copy(data_dir / SHORT, folder / SHORT)
    with wave.open(str(data_dir / "en_leopard_test.wav"), "rb") as src:
        params, frames = src.getparams(), src.readframes(src.getnframes())
    with wave.open(str(folder / LONG), "wb") as out:
        out.setparams(params)
        out.writeframes(frames + b"\0" * (params.sampwidth * params.framerate * 294))
    return folder


def _replica_rss() -> int:
    """The largest resident memory among this cluster's engine replicas (their processes are
    children of the raylet this test started)."""
    sizes = [
        p.info["memory_info"].rss
        for p in psutil.process_iter(["cmdline", "memory_info"])
        if any(
            f"ServeReplica:{APP_NAME}:{REPLICA_DEPLOYMENT}" in part
            for part in p.info["cmdline"] or ()
        )
    ]
    assert sizes, "no replica process found"
    return max(sizes)


def _reported(actor: Any) -> ReplicaLoad | None:
    """The replica's routing stats, waiting (bounded) while Serve is still starting it: a
    replica that replaces a killed one answers before its callable is set up."""
    deadline = time.monotonic() + 90
    while True:
        try:
            return ReplicaLoad.from_stats(ray.get(actor.record_routing_stats.remote()))
        except ray.exceptions.RayTaskError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_low_budget_replica_gets_no_large_request(
    cluster: str, long_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    data_dir = long_dir
    # Size the limit of the low replica from what the replicas report and hold: room for a
    # short upload and less than half of what the long one needs.
    loads = [_reported(actor) for actor in _replica_actors().values()]
    load = next(load for load in loads if load is not None)
    short = need_bytes(load, upload_seconds(os.path.getsize(data_dir / SHORT)))
    long = need_bytes(load, upload_seconds(os.path.getsize(data_dir / LONG)))
    assert long > 2 * short, (short, long)
    room = (short * 2 + long) // 2
    # The low replica starts afresh: its limit is what a fresh replica holds plus the room.
    limit = FRESH["rss"] + room
    # A fresh application, not an update: a rolling update starts the new replicas while the
    # old ones still hold ranks 0 and 1, so the new ones could start as ranks 2 and 3 (Serve
    # renumbers them later) and neither would take the override meant for rank 1.
    serve.delete(APP_NAME)
    serve.run(
        build(_options(tiny_model, tmp_path, by_rank=({}, {"host_memory_limit": str(limit)}))),
        name=APP_NAME,
        route_prefix="/",
    )
    budgets = {}
    for name, actor in _replica_actors().items():
        reported = _reported(actor)
        assert reported is not None
        budgets[name] = reported.budget_bytes
    low = min(budgets, key=lambda name: budgets[name])
    assert short <= budgets[low] < long, (budgets, short, long)

    names = [LONG, SHORT, SHORT, LONG, SHORT, SHORT, SHORT, SHORT]
    with cf.ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda name: _post(cluster, name, data_dir), names))
    assert [r.status_code for r in responses] == [200] * len(names), [r.text for r in responses]
    by = [(name, r.headers[REPLICA_HEADER]) for name, r in zip(names, responses, strict=True)]
    assert all(replica != low for name, replica in by if name == LONG), by
    assert any(replica == low for name, replica in by if name == SHORT), by
