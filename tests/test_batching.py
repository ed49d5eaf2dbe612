"""Cross-request batching through the real server: results go to the right request, options
stay per request, the planner sizes batches, and a full queue answers 429."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import requests

from server.config import Settings
from tests.conftest import free_port, pin_footprint_to_weights, run_server, wer, within
from tests.test_operations import _metric

CLIPS = [
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
]


def _transcribe(url: str, path: Path, **fields: str) -> requests.Response:
    return requests.post(
        url + "/v1/audio/transcriptions",
        files={"file": ("upload", path.read_bytes())},
        data={"model": "whisper-1", **fields},
        timeout=300,
    )


def test_concurrent_requests_are_batched_and_routed(
    server_factory,
    tiny_model: Path,
    data_dir: Path,
) -> None:
    server = server_factory(model=str(tiny_model), batching="on", batch_max_wait_ms=200)
    jobs = [c for c in CLIPS for _ in range(2)]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda c: _transcribe(server.url, data_dir / c), jobs))
    for clip, resp in zip(jobs, results, strict=True):
        assert resp.status_code == 200, resp.text
        reference = (data_dir / clip).with_suffix(".txt").read_text()
        assert within(
            f"WER vs reference ({clip})", wer(reference, resp.json()["text"]), at_most=0.3
        ), (clip, resp.json()["text"])
    # the same clip gives the same text whichever batch it landed in
    texts = {clip: resp.json()["text"] for clip, resp in zip(jobs, results, strict=True)}
    for clip, resp in zip(jobs, results, strict=True):
        assert resp.json()["text"] == texts[clip]
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    assert (_metric(metrics, "whisper_scheduler_mixed_batches_total") or 0) >= 1
    assert (_metric(metrics, "whisper_scheduler_windows_total") or 0) >= len(jobs)
    assert server.engine.reservations.snapshot() == []


def test_per_request_options_in_shared_batches(
    server_factory,
    data_dir: Path,
) -> None:
    """On the multilingual default model: a translation and a transcription of Spanish, and an
    English request with word timestamps, all at once."""
    server = server_factory(batching="on", batch_max_wait_ms=300)
    spanish = data_dir / "es_mls_13697_11991_000000.opus"
    with cf.ThreadPoolExecutor(3) as pool:
        es = pool.submit(_transcribe, server.url, spanish, language="es")
        en = pool.submit(
            _transcribe,
            server.url,
            data_dir / "jfk.flac",
            response_format="verbose_json",
            **{"timestamp_granularities[]": "word"},
        )
        translated = pool.submit(
            requests.post,
            server.url + "/v1/audio/translations",
            files={"file": ("upload", spanish.read_bytes())},
            data={"model": "whisper-1", "response_format": "verbose_json"},
            timeout=300,
        )
    es_text = es.result().json()["text"]
    reference = (data_dir / "es_mls_13697_11991_000000.txt").read_text()
    assert within("Spanish WER vs reference", wer(reference, es_text), at_most=0.5), es_text
    english = translated.result().json()
    assert english["task"] == "translate" and english["language"] == "english"
    assert within("translation WER vs Spanish", wer(reference, english["text"]), at_least=0.8), (
        "translated into English, not transcribed"
    )
    words = en.result().json()
    assert words["words"] and "country" in words["text"].lower()


def test_batch_size_follows_the_planner(
    server_factory,
    tiny_model: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """A host budget that fits one request's working memory at a time: requests wait for memory,
    batches stay at 1, and every request is still answered."""
    probe = server_factory(model=str(tiny_model), batching="on")
    (model,) = probe.engine.pool.loaded()
    from server.memory import Shape

    one = model.cost.estimate(Shape("cpu", model.compute_type, 1, 5, False, 30))
    two = model.cost.estimate(Shape("cpu", model.compute_type, 2, 5, False, 30))
    limit = (
        model.weights_bytes
        + one.device_bytes
        + one.host_bytes(30)
        + (two.device_bytes - one.device_bytes) // 2
    )
    settings = Settings(
        model=str(tiny_model),
        models_dir=tmp_path,
        port=free_port(),
        batching="on",
        batch_max_wait_ms=200,
        host_memory_limit=str(limit),
        max_memory_wait=120,  # requests queue for memory instead of being refused
    )
    with run_server(
        settings, prepare=lambda app: pin_footprint_to_weights(app.state.engine)
    ) as server:
        with cf.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda c: _transcribe(server.url, data_dir / c), CLIPS))
        (stats,) = server.engine.models.scheduler_stats()
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert stats.batches >= 4 and set(stats.batch_sizes) == {1}, stats


def test_batches_side_by_side_share_what_their_requests_reserved(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Two workers' batches at once: each reserves its own working memory, and the memory the
    queued requests already hold (one window each, under the batched key) counts once between
    them, not once in each (which would leave the two batches under-reserved)."""
    import threading

    from server.batching.options import WindowOptions
    from server.memory import Shape
    from server.memory.batch_budget import BatchBudget
    from server.memory.gate import batched_key
    from tests.conftest import make_engine

    engine = make_engine(tiny_model, tmp_path, batching="on")
    try:
        (model,) = engine.pool.loaded()
        budget = BatchBudget(
            engine.gate, model, largest=4, ladder=engine.settings.degrade_ladder, retry_after=1
        )
        key = WindowOptions(beam_size=5).batch_key()
        needs = model.cost.estimate(Shape("cpu", model.compute_type, 2, 5, False, 30))
        queued = engine.reservations.reserve(
            batched_key("cpu"), needs.device_bytes // 2 * 3, "queued"
        )
        inside, leave, held = threading.Barrier(3), threading.Event(), []

        def worker() -> None:
            assert budget.max_batch(key, 2) >= 2
            with budget.batch(key, 2):
                inside.wait(timeout=30)
                leave.wait(timeout=30)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        inside.wait(timeout=30)
        held.append(engine.reservations.total("cpu"))
        leave.set()
        for t in threads:
            t.join(timeout=30)
        assert held == [2 * needs.device_bytes - queued.nbytes]
        assert engine.reservations.total("cpu") == 0  # both batches gave everything back
        assert budget._credited == {} and budget._planned == {}
        queued.release()
        # The engine's own scheduler runs two batches at once on the CPU, each on a
        # CTranslate2 replica of its own beside the sequential slots'.
        assert len(engine.models.scheduler(model)._workers) == 2
        assert model.runner.whisper.model.num_workers == engine.settings.max_concurrency + 2
    finally:
        engine.close()


def test_the_cpu_runs_two_batches_at_once_and_a_gpu_one() -> None:
    settings = Settings()
    assert settings.batch_workers_on("cpu") == 2 and settings.batch_workers_on("cuda") == 1
    assert settings.model_workers_on("cpu") == settings.max_concurrency + 2
    assert settings.model_workers_on("cuda") == settings.max_concurrency
    assert Settings(batch_workers=3).batch_workers_on("cuda") == 3
