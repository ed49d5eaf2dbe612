"""The engine with real models and real audio on the CPU: memory planning end to end.

Host memory budgets are set through WHISPER_HOST_MEMORY_LIMIT, derived from the engine's own
cost model so each test forces exactly the behaviour it is about (chunking, dropping word
timestamps, rejecting), then the results are checked against an unconstrained run.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.harness import cer, longest_loss
from server.audio.decode import decode_audio
from server.config import Settings
from server.engine.core import Engine
from server.engine.residency import LoadedModel
from server.errors import InsufficientMemoryError
from server.memory import Shape
from server.request import Job
from tests.conftest import (
    free_port,
    make_engine,
    out_of_memory_faults,
    pin_footprint_to_weights,
    run_server,
    wer,
    within,
)

LONG = "en_ljspeech_LJ001-0001_to_0032_concat.flac"


def job_for(engine: Engine, data_dir: Path, name: str, **options: Any) -> Job:
    audio = decode_audio((data_dir / name).read_bytes(), max_duration=3600)
    assert engine.served is not None
    return Job(request_id="test", audio=audio.samples, source=engine.served, **options)


def only_model(engine: Engine) -> LoadedModel:
    (model,) = engine.pool.loaded()
    return model


def host_limit_for(engine: Engine, shape: Shape, audio_seconds: float) -> int:
    """A host limit that holds the weights, the shape's working memory and ``audio_seconds``
    of audio, with 1 MiB to spare."""
    model = only_model(engine)
    estimate = model.cost.estimate(shape)
    return (
        model.weights_bytes + estimate.device_bytes + estimate.host_bytes(audio_seconds) + (1 << 20)
    )


@pytest.fixture(scope="module")
def unconstrained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_model, tmp_path_factory.mktemp("m"), batch_size=1)


def test_long_audio_is_chunked_under_a_host_budget(
    unconstrained: Engine, tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    job = job_for(unconstrained, data_dir, LONG)
    reference = unconstrained.run(job)
    assert len(reference.segments) >= 8  # one or more per window of speech (<= 30 s)

    shape = unconstrained.planner.requested_shape(only_model(unconstrained), job)
    limit = host_limit_for(unconstrained, shape, 95.0)  # room for 90 s pieces, not 231 s
    engine = make_engine(tiny_model, tmp_path, batch_size=1, host_memory_limit=str(limit))
    chunked = engine.run(job_for(engine, data_dir, LONG))

    pieces = [d for d in engine.stats.recent if d["request_id"] == "test"]
    # one plan per piece (the whole-request survey is not logged): 231 s in pieces of <= 90 s
    assert len(pieces) >= 3, pieces
    assert all(not d["degradations"] for d in pieces), pieces
    # Close to the unchunked run: the text after a cut is conditioned on other context, so
    # rare names may be spelled another way further on ("Gutenberg"/"Guttenberg"); what must
    # not happen is words lost or repeated at a cut. Measured over CTranslate2's CPU kernel
    # paths (MKL and oneDNN, AVX-512 to generic; bench/kernel_paths.py): WER 0.011-0.021,
    # letters 0.003-0.005, at most 1 word lost in a row. The bounds are about twice the worst.
    text = (reference.text, chunked.text)
    assert within("chunked WER", wer(*text), at_most=0.04), text
    assert within("chunked letter error", cer(*(t.lower() for t in text)), at_most=0.01), text
    assert within("chunked words lost in a row", longest_loss(*text), at_most=3), text

    ends = [(s.start, s.end) for s in chunked.segments]
    for (start, end), (next_start, _) in itertools.pairwise(ends):
        assert start <= end <= next_start + 0.05  # in order, no overlap
        assert next_start - end < 5.0  # no hole where words went missing
    assert ends[-1][1] == pytest.approx(chunked.duration, abs=3.0)
    assert [s.id for s in chunked.segments] == list(range(len(chunked.segments)))


def test_words_dropped_only_when_the_budget_forces_it(
    unconstrained: Engine, tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    job = job_for(unconstrained, data_dir, "jfk.flac", word_timestamps=True)
    asked = unconstrained.planner.requested_shape(only_model(unconstrained), job)
    assert asked.word_timestamps and asked.beam_size == 5

    # The smallest shape the ladder reaches before dropping words: 10 s windows, greedy.
    smallest = replace(asked, chunk_length=10, beam_size=1)
    with_words = host_limit_for(unconstrained, smallest, 11.0)
    without_words = host_limit_for(unconstrained, replace(smallest, word_timestamps=False), 11.0)
    assert without_words < with_words, "the cost model must charge for the alignment pass"

    # Enough for words at the smallest shape: other steps are taken, words are kept.
    engine = make_engine(tiny_model, tmp_path / "a", host_memory_limit=str(with_words))
    kept = engine.run(job_for(engine, data_dir, "jfk.flac", word_timestamps=True))
    kinds = {kind for kind, _ in kept.degradations}
    assert "word_timestamps" not in kinds and kinds, kept.degradations
    assert all(s.words for s in kept.segments)

    # Not enough: words go, segments stay, and the reason is recorded.
    engine = make_engine(tiny_model, tmp_path / "b", host_memory_limit=str(without_words))
    dropped = engine.run(job_for(engine, data_dir, "jfk.flac", word_timestamps=True))
    reasons = dict(dropped.degradations)
    assert "word_timestamps" in reasons and "needs" in reasons["word_timestamps"]
    assert dropped.segments and all(s.words is None for s in dropped.segments)
    assert within("WER without words vs with", wer(kept.text, dropped.text), at_most=0.2)


def test_rejects_with_retry_after_when_nothing_fits(
    tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    engine = make_engine(tiny_model, tmp_path, host_memory_limit="1MiB", max_memory_wait=0)
    with pytest.raises(InsufficientMemoryError) as info:
        engine.run(job_for(engine, data_dir, "jfk.flac"))
    assert info.value.status == 503
    assert info.value.headers["Retry-After"] == "5"
    assert engine.stats.rejected == 1
    assert engine.reservations.total("cpu") == 0 and engine.reservations.total("host") == 0


def test_waiting_for_memory_is_reported(
    unconstrained: Engine, tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    """/v1/memory counts a request waiting for memory, and its decision says how it ended."""
    job = job_for(unconstrained, data_dir, "jfk.flac")
    asked = unconstrained.planner.requested_shape(only_model(unconstrained), job)
    limit = host_limit_for(unconstrained, asked, 11.0)
    engine = make_engine(
        tiny_model,
        tmp_path,
        host_memory_limit=str(limit),
        memory_policy="strict",
        max_memory_wait=60,
    )
    other = engine.reservations.reserve("host", limit, "someone else")
    result: list[Any] = []
    worker = threading.Thread(
        target=lambda: result.append(engine.run(job_for(engine, data_dir, "jfk.flac")))
    )
    worker.start()
    deadline = time.monotonic() + 30
    while engine.memory_report()["requests"]["waiting_for_memory"] != 1:
        assert time.monotonic() < deadline, "the request never waited"
        time.sleep(0.05)
    assert engine.memory_report()["requests"]["running"] == 1
    other.release()
    worker.join(timeout=60)
    assert result and "country" in result[0].text
    report = engine.memory_report()
    assert report["requests"]["waiting_for_memory"] == report["requests"]["running"] == 0
    decision = report["recent_decisions"][-1]
    assert decision["action"] == "run" and decision["waited_s"] > 0
    assert decision["outcome"] == "ok" and decision["audio_seconds"] == pytest.approx(11, abs=0.5)


def test_reservations_released_after_each_request(unconstrained: Engine, data_dir: Path) -> None:
    unconstrained.run(job_for(unconstrained, data_dir, "jfk.flac"))
    assert unconstrained.reservations.snapshot() == []


# ---- through HTTP: the header, the verbose_json field, recovery from a real OOM error ---------


def test_degradation_is_reported_in_header_and_body(
    unconstrained: Engine,
    tiny_model: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    job = job_for(unconstrained, data_dir, "jfk.flac", word_timestamps=True)
    smallest = replace(
        unconstrained.planner.requested_shape(only_model(unconstrained), job),
        chunk_length=10,
        beam_size=1,
        word_timestamps=False,
    )
    limit = host_limit_for(unconstrained, smallest, 11.0)
    settings = Settings(
        model=str(tiny_model), models_dir=tmp_path, port=free_port(), host_memory_limit=str(limit)
    )
    with run_server(
        settings, prepare=lambda app: pin_footprint_to_weights(app.state.engine)
    ) as server:
        resp = requests.post(
            server.url + "/v1/audio/transcriptions",
            files={"file": ("seed.webm", (data_dir / "jfk.webm").read_bytes())},
            data={
                "model": "whisper-1",
                "response_format": "verbose_json",
                "timestamp_granularities[]": "word",
            },
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        assert "word_timestamps" in resp.headers["x-whisper-degraded"].split(",")
        body = resp.json()
        assert body["words"] == [] and body["segments"]
        kinds = {d["kind"] for d in body["x_whisper_degraded"]}
        assert "word_timestamps" in kinds
        memory = requests.get(server.url + "/v1/memory", timeout=5).json()
        assert memory["counters"]["degradations"]["word_timestamps"] >= 1
        assert memory["recent_decisions"][-1]["word_timestamps"] is False


def test_out_of_memory_is_recovered(tiny_model: Path, data_dir: Path, tmp_path: Path) -> None:
    """The fault fixture makes the first inference call raise CTranslate2's own OOM message."""
    settings = Settings(model=str(tiny_model), models_dir=tmp_path, port=free_port())
    with run_server(settings) as server, out_of_memory_faults(server.engine, calls=1):
        resp = requests.post(
            server.url + "/v1/audio/transcriptions",
            files={"file": ("a.flac", (data_dir / "jfk.flac").read_bytes())},
            data={"model": "whisper-1", "response_format": "verbose_json"},
            timeout=120,
        )
        memory = requests.get(server.url + "/v1/memory", timeout=5).json()
        healthy = requests.get(server.url + "/health", timeout=5).status_code
    assert resp.status_code == 200, resp.text
    assert "oom_retry" in resp.headers["x-whisper-degraded"]
    assert "country" in resp.json()["text"].lower()
    assert memory["counters"]["oom_recoveries"] == 1
    assert memory["reservations"] == []
    assert healthy == 200


def test_memory_endpoint(tiny_server) -> None:
    memory = requests.get(tiny_server.url + "/v1/memory", timeout=5).json()
    assert memory["device"] == "cpu"
    host = memory["devices"][0]
    assert host["total_bytes"] > host["free_bytes"] > 0
    assert memory["models"][0]["weights_bytes"] > 10 << 20
    assert memory["policy"]["ladder"][0] == "batch"


# ---- device detection tells the truth ----------------------------------------------------------
# This host has no GPU and no cuBLAS; CTranslate2 is made to count one device, which is what a
# GPU host without CUDA 12's cuBLAS looks like to it.


def test_a_gpu_without_cublas_serves_on_the_cpu_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    import ctranslate2

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    settings = Settings(model=str(tiny_model), models_dir=tmp_path, port=free_port())
    with run_server(settings) as server:
        ready = requests.get(server.url + "/ready", timeout=5).json()
        assert ready["ready"] is True and ready["device"] == "cpu"
        assert "libcublas.so.12 cannot be loaded" in ready["device_reason"]
        with open(data_dir / "jfk.flac", "rb") as fh:
            resp = requests.post(
                server.url + "/v1/audio/transcriptions",
                files={"file": ("jfk.flac", fh)},
                data={"model": "whisper-1"},
                timeout=120,
            )
        assert resp.status_code == 200 and "country" in resp.json()["text"]


def test_cuda_required_without_cublas_is_not_ready(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path
) -> None:
    import ctranslate2

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    engine = Engine(Settings(model=str(tiny_model), models_dir=tmp_path, device="cuda"))
    engine.start()
    assert not engine.ready
    assert engine.load_error is not None and "libcublas.so.12" in engine.load_error


@pytest.mark.parametrize("wanted", ["auto", "cuda"])
def test_a_model_that_cannot_run_on_the_gpu_falls_back_or_fails(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path, wanted: str
) -> None:
    """Detection passes (as with a cuBLAS that loads), but loading on CUDA fails for real
    here: ``auto`` serves on the CPU with the failure in ``device_reason``; ``cuda`` does not
    start, naming it."""
    monkeypatch.setattr(
        "server.engine.core.cuda_available",
        lambda: (True, "1 CUDA device(s) visible to CTranslate2"),
    )
    engine = Engine(Settings(model=str(tiny_model), models_dir=tmp_path, device=wanted))
    pin_footprint_to_weights(engine)
    engine.start()
    if wanted == "auto":
        assert engine.ready and engine.device == "cpu"
        assert "could not be loaded on cuda" in engine.device_reason
        assert engine.device_reason.endswith("running on the CPU")
        assert [m.device for m in engine.pool.loaded()] == ["cpu"]
    else:
        assert not engine.ready
        assert engine.load_error is not None
        assert engine.load_error.startswith("WHISPER_DEVICE=cuda but Model")
        assert not engine.pool.loaded()
