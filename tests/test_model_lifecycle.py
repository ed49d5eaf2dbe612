"""Models loaded on first use under the planner, unloaded when idle (WHISPER_MODEL_TTL) or to
make room, and by hand through POST/DELETE /v1/models/{id}.

The second and third models are tiny.en again, in folders of their own in the store (links to
its files), so they load as separate models at a fraction of a real model's cost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from server.audio.decode import decode_audio
from server.config import Settings
from server.engine.core import Engine
from server.engine.store import install_default_model
from server.errors import InsufficientMemoryError
from server.memory import MemoryAmount, Shape
from server.request import Job
from tests.conftest import free_port, make_engine, run_server


def store_with_copies(tiny_model: Path, models_dir: Path, *names: str) -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        folder = models_dir / name
        folder.mkdir()
        for f in tiny_model.iterdir():
            (folder / f.name).symlink_to(f)
    return models_dir


def loaded_ids(engine: Engine) -> set[str]:
    return {m.source.id for m in engine.pool.loaded()}


def jfk_job(engine: Engine, data_dir: Path, model: str | None = None) -> Job:
    audio = decode_audio((data_dir / "jfk.flac").read_bytes(), max_duration=60)
    assert engine.served is not None
    source = engine.store.resolve(model, engine.served) if model else engine.served
    return Job(request_id="lifecycle", audio=audio.samples, source=source)


def sizes(engine: Engine) -> tuple[int, int, int]:
    """(weights, working memory of the smallest window, the peak of loading it) of the served
    tiny.en on the CPU."""
    (model,) = engine.pool.loaded()
    smallest = Shape("cpu", model.compute_type, 1, 1, False, 30, False)
    peak = model.cost.load_host_bytes(model.compute_type, "cpu")
    return model.weights_bytes, model.cost.estimate(smallest).device_bytes, peak


# ---- planned loads and the eviction rung (the engine, under a host memory limit) ------------


def test_a_load_that_does_not_fit_unloads_an_idle_model_first(
    tiny_model: Path, tmp_path: Path
) -> None:
    store = store_with_copies(tiny_model, tmp_path, "tiny-b", "tiny-c")
    probe = make_engine(tiny_model, tmp_path / "probe")
    weights, _, peak = sizes(probe)
    probe.close()
    # Room for the served model and the load of one more, not for a load beside two.
    engine = make_engine(
        tiny_model, store, host_memory_limit=str(weights + peak + (1 << 20)), model_ttl=-1
    )
    engine.load(engine.store.resolve("tiny-b", engine.served))  # type: ignore[arg-type]
    assert loaded_ids(engine) == {engine.served.id, "tiny-b"}  # type: ignore[union-attr]
    engine.load(engine.store.resolve("tiny-c", engine.served))  # type: ignore[arg-type]
    assert loaded_ids(engine) == {engine.served.id, "tiny-c"}  # type: ignore[union-attr]
    assert engine.stats.unloads == 1
    engine.close()


def test_a_load_with_no_room_and_nothing_idle_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    store = store_with_copies(tiny_model, tmp_path, "tiny-b")
    probe = make_engine(tiny_model, tmp_path / "probe")
    weights, work, _ = sizes(probe)
    probe.close()
    engine = make_engine(
        tiny_model,
        store,
        host_memory_limit=str(weights + work + (4 << 20)),
        max_memory_wait=0.2,
    )
    with pytest.raises(InsufficientMemoryError, match="to load model 'tiny-b'") as err:
        engine.load(engine.store.resolve("tiny-b", engine.served))  # type: ignore[arg-type]
    assert err.value.status == 503 and "Retry-After" in err.value.headers
    assert loaded_ids(engine) == {engine.served.id}  # type: ignore[union-attr]
    engine.close()


def test_an_idle_model_is_unloaded_before_a_request_is_degraded(
    tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    store = store_with_copies(tiny_model, tmp_path, "tiny-b")
    probe = make_engine(tiny_model, tmp_path / "probe")
    job = jfk_job(probe, data_dir)
    (model,) = probe.pool.loaded()
    estimate = model.cost.estimate(probe.planner.requested_shape(model, job))
    # The served model, one request as asked and 1 MiB: not a second model besides.
    limit = model.weights_bytes + estimate.device_bytes + estimate.host_bytes(11.0) + (1 << 20)
    probe.close()
    # Room to load tiny-b first (its load peaks above the request's needs)...
    peak = model.cost.load_host_bytes(model.compute_type, "cpu")
    engine = make_engine(
        tiny_model, store, host_memory_limit=str(model.weights_bytes + peak), model_ttl=-1
    )
    engine.load(engine.store.resolve("tiny-b", engine.served))  # type: ignore[arg-type]
    # ...then the limit the request meets.
    engine.settings.host_memory_limit = MemoryAmount.parse(str(limit))

    transcript = engine.run(jfk_job(engine, data_dir))
    kinds = [kind for kind, _ in transcript.degradations]
    assert kinds == ["evict"], transcript.degradations  # and nothing else was given up
    assert "unloaded idle model tiny-b" in transcript.degradations[0][1]
    assert "country" in transcript.text
    assert loaded_ids(engine) == {engine.served.id}  # type: ignore[union-attr]
    engine.close()


# A fresh process (its resident memory is the server's alone): tiny.en served, base loaded and
# left idle, then the limit set at what the process holds plus argv[3] bytes, and tiny.en loaded
# again under another name. It prints its peak resident memory (VmHWM, reset just before).
_LOAD_UNDER_A_LIMIT = """
import json, sys
from pathlib import Path
from server.config import Settings
from server.engine.core import Engine
from server.memory import MemoryAmount
from server.memory.host_heap import configure

configure()
tiny, store, extra = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
engine = Engine(Settings(model=tiny, models_dir=store, model_ttl=-1, host_headroom="0"))
engine.start()
engine.load(engine.store.resolve("whisper-base", engine.served))
engine.settle()
limit = engine.footprint() + extra
engine.settings.host_memory_limit = MemoryAmount.parse(str(limit))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets VmHWM to the resident memory now
error = None
try:
    engine.load(engine.store.resolve("tiny-c", engine.served))
except Exception as exc:
    error = str(exc)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmHWM:"))
print(json.dumps({"limit": limit, "peak": peak, "error": error, "unloads": engine.stats.unloads,
                  "loaded": sorted(m.source.id for m in engine.pool.loaded())}))
engine.close()
"""


def test_a_load_is_planned_with_its_real_peak_and_evicts_first(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Loading a model on the CPU holds its file and its converted weights at once (tiny.en:
    172 MiB at the peak for 39 MiB of int8 weights). Under a host limit 130 MiB above what the
    process holds (room for the weights and a window, not for the peak), the idle base model is
    unloaded before the load, and the process's real peak RSS stays under the limit; planned
    with the weights alone, the load went ahead beside base and peaked above it."""
    store = store_with_copies(tiny_model, tmp_path / "store", "tiny-c")
    install_default_model(store)  # whisper-base, the model to evict
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_A_LIMIT, str(tiny_model), str(store), str(130 << 20)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result
    assert result["unloads"] == 1 and "whisper-base" not in result["loaded"], result
    assert "tiny-c" in result["loaded"], result
    assert result["peak"] <= result["limit"], (result["peak"] - result["limit"]) / 2**20


# ---- over HTTP: TTL, load and unload by hand, one load for concurrent first uses ------------


def post_jfk(url: str, data_dir: Path, model: str, key: str | None = None) -> requests.Response:
    with open(data_dir / "jfk.flac", "rb") as fh:
        return requests.post(
            url + "/v1/audio/transcriptions",
            files={"file": ("jfk.flac", fh)},
            data={"model": model},
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=120,
        )


def test_models_load_on_first_use_and_unload_after_the_ttl(
    tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    store = store_with_copies(tiny_model, tmp_path, "tiny-b")
    settings = Settings(model=str(tiny_model), models_dir=store, port=free_port(), model_ttl=1)
    with run_server(settings) as server:
        engine = server.engine
        loads = []
        real_load = engine.pool._load

        def counted(*args: Any, **kwargs: Any) -> Any:
            loads.append(args[0].id)
            return real_load(*args, **kwargs)

        engine.pool._load = counted
        # Concurrent first requests for one model load it once.
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post_jfk(server.url, data_dir, "tiny-b"), range(3)))
        assert [a.status_code for a in answers] == [200] * 3
        assert all("country" in a.json()["text"] for a in answers)
        assert loads == ["tiny-b"]

        card = requests.get(server.url + "/v1/models/tiny-b", timeout=5).json()
        assert [c["device"] for c in card["loaded"]] == ["cpu"]
        deadline = time.monotonic() + 15
        while requests.get(server.url + "/v1/models/tiny-b", timeout=5).json()["loaded"]:
            assert time.monotonic() < deadline, "tiny-b was not unloaded after its TTL"
            time.sleep(0.2)
        served = requests.get(server.url + "/v1/models/whisper-1", timeout=5).json()
        assert served["loaded"] and served["loaded"][0]["pinned"] is True  # the TTL spares it
        memory = requests.get(server.url + "/v1/memory", timeout=5).json()
        assert memory["counters"]["unloads"] == 1
        assert post_jfk(server.url, data_dir, "tiny-b").status_code == 200  # loaded again
        assert loads == ["tiny-b", "tiny-b"]


def test_ttl_zero_unloads_right_after_the_request(
    tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    store = store_with_copies(tiny_model, tmp_path, "tiny-b")
    settings = Settings(model=str(tiny_model), models_dir=store, port=free_port(), model_ttl=0)
    with run_server(settings) as server:
        assert post_jfk(server.url, data_dir, "tiny-b").status_code == 200
        assert requests.get(server.url + "/v1/models/tiny-b", timeout=5).json()["loaded"] == []
        assert requests.get(server.url + "/ready", timeout=5).status_code == 200


def test_load_and_unload_by_hand(tiny_model: Path, tmp_path: Path, data_dir: Path) -> None:
    store = store_with_copies(tiny_model, tmp_path, "tiny-b")
    settings = Settings(
        model=str(tiny_model),
        models_dir=store,
        port=free_port(),
        api_keys=["secret"],
        model_ttl=-1,
    )
    with run_server(settings) as server:
        url, auth = server.url, {"Authorization": "Bearer secret"}
        assert requests.post(url + "/v1/models/tiny-b", timeout=60).status_code == 401
        loaded = requests.post(url + "/v1/models/tiny-b", headers=auth, timeout=60)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["loaded"][0]["device"] == "cpu"
        assert loaded.json()["loaded"][0]["weights_bytes"] > 0

        client = openai.OpenAI(base_url=url + "/v1", api_key="secret")
        ids = [m.id for m in client.models.list().data]
        assert "tiny-b" in ids and "whisper-1" in ids
        assert client.models.delete("tiny-b").deleted is True
        assert (
            requests.get(url + "/v1/models/tiny-b", headers=auth, timeout=5).json()["loaded"] == []
        )
        gone = requests.delete(url + "/v1/models/tiny-b", headers=auth, timeout=5)
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
        pinned = requests.delete(url + "/v1/models/whisper-1", headers=auth, timeout=5)
        assert pinned.status_code == 409
        assert "WHISPER_PIN_DEFAULT_MODEL" in pinned.json()["error"]["message"]
        unknown = requests.post(url + "/v1/models/nope", headers=auth, timeout=5)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"


def test_a_model_in_use_is_unloaded_when_its_request_ends(
    tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    store = store_with_copies(tiny_model, tmp_path, "tiny-b")
    settings = Settings(model=str(tiny_model), models_dir=store, port=free_port(), model_ttl=-1)
    with run_server(settings) as server:
        engine = server.engine
        started, release = threading.Event(), threading.Event()
        real_run = engine.pipeline.run

        def slow_run(model: Any, *args: Any) -> Any:
            started.set()
            release.wait(30)
            return real_run(model, *args)

        engine.pipeline.run = slow_run  # type: ignore[method-assign]
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post_jfk, server.url, data_dir, "tiny-b")
            assert started.wait(60)
            held = requests.delete(server.url + "/v1/models/tiny-b", timeout=5)
            assert held.status_code == 202 and held.json()["deleted"] is False
            assert held.json()["loaded"][0]["in_use"] == 1
            release.set()
            assert answer.result().status_code == 200
        assert "tiny-b" not in loaded_ids(engine)
