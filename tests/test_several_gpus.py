"""Several GPUs in one box (WHISPER_DEVICE_INDEX=0,1): each request, and each piece of a long
file, goes to the GPU whose free memory fits it best, with a copy of the model loaded there on
demand.

No GPU here: NVML is the fake of tests/memory (two 24 GiB GPUs whose free memory the tests set,
read through the real NvmlProbe and planner), and the model copies "on" each GPU run on the CPU
(the loader is asked for cuda:N and loads on the CPU instead). What is tested is the placement:
the memory readings, budgets, reservations and copies per device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.audio.decode import decode_audio
from server.config import Settings
from server.engine.core import Engine
from server.memory.probes import NvmlProbe
from server.request import Job
from server.whisper.runner import WhisperRunner
from tests.conftest import pin_footprint_to_weights, within
from tests.memory.test_memory_probes import UUID_A, UUID_B, FakeNvml

GiB = 1 << 30
LONG = "en_mfa_michaelandsickmichael.flac"  # 52 s: two pieces of at most 30 s


@pytest.fixture
def two_gpus(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path
) -> Iterator[tuple[Engine, FakeNvml, list[int]]]:
    nvml = FakeNvml()  # ordinal 0 is GPU A, 1 is GPU B
    loaded_on: list[int] = []
    real_load = WhisperRunner.load.__func__  # type: ignore[attr-defined]

    def load_on_cpu(cls: type, folder: Path, **kwargs: Any) -> WhisperRunner:
        assert kwargs["device"] == "cuda"
        loaded_on.append(kwargs["device_index"])
        kwargs.update(device="cpu", device_index=0, compute_type="int8")
        return real_load(cls, folder, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(WhisperRunner, "load", classmethod(load_on_cpu))
    monkeypatch.setattr(
        "server.engine.core.cuda_available", lambda: (True, "2 CUDA device(s) (fake)")
    )
    monkeypatch.setattr(
        "server.memory.gate.open_probe",
        lambda place, index=0: NvmlProbe(
            int(place.split(":")[1]), nvml=nvml, environ={}, driver_identity=None
        ),
    )
    settings = Settings(
        model=str(tiny_model), models_dir=tmp_path, device="cuda", device_index=[0, 1]
    )
    engine = Engine(settings)
    pin_footprint_to_weights(engine)
    engine.start()
    assert engine.ready, engine.load_error
    yield engine, nvml, loaded_on
    engine.close()


def set_free(nvml: FakeNvml, uuid: str, free: int) -> None:
    nvml.memory[uuid] = (24 * GiB, free)


def job(engine: Engine, data_dir: Path, name: str, request_id: str) -> Job:
    audio = decode_audio((data_dir / name).read_bytes(), max_duration=3600)
    assert engine.served is not None
    return Job(request_id=request_id, audio=audio.samples, source=engine.served)


def places_of(engine: Engine, request_id: str) -> list[str]:
    return [d["device"] for d in engine.stats.recent if d["request_id"] == request_id]


def test_requests_go_where_memory_is_free_and_copies_load_on_demand(
    two_gpus: tuple[Engine, FakeNvml, list[int]], data_dir: Path
) -> None:
    engine, nvml, loaded_on = two_gpus
    assert engine.places == ["cuda:0", "cuda:1"]
    assert loaded_on == [0]  # the served model starts on the first GPU only

    # Both have room: the GPU that already holds the model takes it, no second copy.
    set_free(nvml, UUID_A, 6 * GiB)
    set_free(nvml, UUID_B, 20 * GiB)
    first = engine.run(job(engine, data_dir, "jfk.flac", "first"))
    assert "country" in first.text
    assert places_of(engine, "first") == ["cuda:0"] and loaded_on == [0]

    # GPU 0 fills up (other work took it): the next request goes to GPU 1, which gets a copy.
    set_free(nvml, UUID_A, 300 << 20)
    second = engine.run(job(engine, data_dir, "jfk.flac", "second"))
    assert "country" in second.text and not second.degradations
    assert places_of(engine, "second") == ["cuda:1"] and loaded_on == [0, 1]
    assert sorted(m.device for m in engine.pool.loaded()) == ["cuda:0", "cuda:1"]
    report = engine.memory_report()
    assert [d["device"] for d in report["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    assert report["devices"][0]["free_bytes"] == 300 << 20

    # Reservations are per GPU: while a request runs on GPU 1, GPU 0's ledger stays empty.
    assert engine.gate.reserved_bytes("cuda:0") == engine.gate.reserved_bytes("cuda:1") == 0


def test_the_pieces_of_a_long_file_follow_the_free_memory(
    two_gpus: tuple[Engine, FakeNvml, list[int]], data_dir: Path
) -> None:
    engine, nvml, loaded_on = two_gpus
    engine.settings.max_piece_duration = 30.0
    set_free(nvml, UUID_A, 20 * GiB)
    set_free(nvml, UUID_B, 20 * GiB)
    real_run_piece = engine.pipeline._run_piece
    pieces = []

    def run_piece(model: Any, *args: Any) -> Any:
        pieces.append(model.device)
        if len(pieces) == 2:  # mid-run (after the first piece), GPU 0 fills up; GPU 1 is free
            set_free(nvml, UUID_A, 200 << 20)
        return real_run_piece(model, *args)

    engine.pipeline._run_piece = run_piece  # type: ignore[method-assign]
    transcript = engine.run(job(engine, data_dir, LONG, "long"))
    assert within("words", len(transcript.text.split()), at_least=51)
    placed = places_of(engine, "long")
    assert len(pieces) == 2 and placed[0] == "cuda:0" and placed[-1] == "cuda:1", placed
    assert loaded_on == [0, 1]
    # The copy on GPU 1 was held for the request and let go at its end.
    assert all(m.in_use == 0 for m in engine.pool.loaded())
