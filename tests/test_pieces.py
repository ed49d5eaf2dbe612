"""Long audio in bounded memory: decoded piece by piece under the planner's reservations.

Real audio and the real tiny.en model. The upload is opened as a stream and never decoded in
one go: each piece is read (decoded) only once the planner has reserved its host memory, and
the reservation is released when the piece is done.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from server.audio.decode import AudioStream, decode_audio
from server.audio.pieces import ArraySource, PieceReader, split_on_silence
from server.config import Settings
from server.engine.core import Engine
from server.errors import AudioError
from server.memory.gate import HOST
from server.request import Job
from tests.conftest import pin_footprint_to_weights, wer, within

LONG = "en_ljspeech_LJ001-0001_to_0032_concat.flac"


def piece_engine(tiny_model: Path, models_dir: Path, batching: str) -> Engine:
    """A started engine on tiny.en that reads long files in pieces of 60 s."""
    settings = Settings(
        model=str(tiny_model), models_dir=models_dir, max_piece_duration=60, batching=batching
    )
    engine = Engine(settings)
    pin_footprint_to_weights(engine)
    engine.start()
    assert engine.ready, engine.load_error
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return piece_engine(tiny_model, tmp_path_factory.mktemp("m"), "off")


def test_streamed_pieces_are_cut_where_the_whole_file_would_be(data_dir: Path) -> None:
    data = (data_dir / LONG).read_bytes()
    whole = decode_audio(data, max_duration=3600).samples
    spans = split_on_silence(whole, max_span_s=60.0)
    with AudioStream(data, max_duration=3600) as stream:
        reader = PieceReader(stream)
        pieces = []
        while (piece := reader.next(60.0)) is not None:
            pieces.append(piece)
    assert [(p.start, p.end) for p in pieces] == [(s.start, s.end) for s in spans]
    np.testing.assert_array_equal(np.concatenate([p.samples for p in pieces]), whole)
    assert pieces[-1].last and not any(p.last for p in pieces[:-1])


def test_the_stream_is_decoded_a_piece_at_a_time(engine: Engine, data_dir: Path) -> None:
    """No read asks for more than a piece (60 s here, plus the second the VAD hears past the
    cut), and every piece's host reservation is sized for a piece, not for the file."""
    data = (data_dir / LONG).read_bytes()
    stream = AudioStream(data, max_duration=3600)
    reads: list[int] = []
    original = stream.read

    def read(max_samples: int) -> Any:
        reads.append(max_samples)
        return original(max_samples)

    stream.read = read  # type: ignore[method-assign]
    host_peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.002):
            host_peak[0] = max(host_peak[0], engine.reservations.total(HOST))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        transcript = engine.run(Job(request_id="pieces", audio=stream, source=engine.served))
    finally:
        done.set()
        watcher.join()
    assert transcript.duration == pytest.approx(231, abs=1)
    assert len(reads) >= 4 and max(reads) <= 61 * 16000, reads
    (model,) = engine.pool.loaded()
    shape = engine.planner.requested_shape(
        model, Job(request_id="x", audio=np.zeros(16000 * 60), source=engine.served)
    )
    per_piece = model.cost.estimate(shape).host_bytes(61)
    whole_file = model.cost.estimate(shape).host_bytes(231)
    assert 0 < host_peak[0] <= per_piece < whole_file
    assert engine.reservations.snapshot() == []

    reference = decode_audio(data, max_duration=3600).samples
    unchunked = engine.run(Job(request_id="ref", audio=reference, source=engine.served))
    assert unchunked.duration == pytest.approx(transcript.duration, abs=0.01)
    assert within("WER vs unchunked", wer(unchunked.text, transcript.text), at_most=0.05)


def test_a_stream_that_fails_part_way_is_a_400(engine: Engine, data_dir: Path) -> None:
    """An upload cut off in the middle: the header promises more than there is. The engine
    stops with the audio error (the request's 400) and releases everything."""
    data = (data_dir / LONG).read_bytes()
    stream = AudioStream(data[: len(data) // 2], max_duration=3600)
    with pytest.raises(AudioError) as info:
        engine.run(Job(request_id="cut", audio=stream, source=engine.served))
    assert info.value.code == "truncated_audio"
    assert engine.reservations.snapshot() == []


def test_an_array_source_reads_views() -> None:
    samples = np.arange(10, dtype=np.float32)
    source = ArraySource(samples)
    first = source.read(4)
    assert np.shares_memory(first, samples) and list(first) == [0, 1, 2, 3]
    assert len(source.read(100)) == 6 and source.finished and not len(source.read(1))


def test_streamed_events_start_before_a_long_file_is_done(
    server_factory, tiny_model: Path, data_dir: Path
) -> None:
    """With several pieces, the first delta arrives long before the done event."""
    server = server_factory(model=str(tiny_model), max_piece_duration=60)
    started = time.perf_counter()
    arrivals: list[tuple[float, str]] = []
    with requests.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": ("long.flac", (data_dir / LONG).read_bytes())},
        data={"model": "whisper-1", "stream": "true"},
        stream=True,
        timeout=300,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith(b"data: "):
                kind = "done" if b"transcript.text.done" in line else "delta"
                arrivals.append((time.perf_counter() - started, kind))
    deltas = [t for t, kind in arrivals if kind == "delta"]
    done = [t for t, kind in arrivals if kind == "done"]
    assert deltas and len(done) == 1
    assert deltas[0] < done[0] / 2, arrivals


def test_a_batch_reserves_for_the_windows_it_takes(
    tiny_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    """A piece planned for a batch of 5 windows that holds one window of speech (a clip, then
    two minutes of silence): the batch reserves for the one window it runs, which the request's
    own reservation already covers, not for the four that never come."""
    settings = Settings(model=str(tiny_model), models_dir=tmp_path, batching="on", batch_size=8)
    engine = Engine(settings)
    pin_footprint_to_weights(engine)
    engine.start()
    assert engine.ready, engine.load_error
    reserved: list[tuple[str, int, str]] = []
    original = engine.reservations.reserve

    def reserve(device: str, nbytes: int, owner: str, api_key: str | None = None) -> Any:
        reserved.append((device, nbytes, owner))
        return original(device, nbytes, owner, api_key)

    engine.reservations.reserve = reserve  # type: ignore[method-assign]
    clip = decode_audio((data_dir / "jfk.flac").read_bytes(), max_duration=60).samples
    audio = np.concatenate([clip, np.zeros(120 * 16000, dtype=np.float32)])
    try:
        transcript = engine.run(Job(request_id="sparse", audio=audio, source=engine.served))
    finally:
        engine.close()
    assert "fellow Americans" in transcript.text
    (model,) = engine.pool.loaded()
    planned = engine.planner.requested_shape(
        model, Job(request_id="x", audio=audio, source=engine.served)
    )
    assert planned.batch_size == 5  # what the piece was planned for
    batches = [nbytes for _, nbytes, owner in reserved if owner == "batch"]
    assert batches and set(batches) == {0}, reserved
    assert engine.reservations.snapshot() == []


@pytest.fixture(scope="module")
def batched(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return piece_engine(tiny_model, tmp_path_factory.mktemp("m"), "on")


def test_the_next_piece_is_queued_while_the_last_batches_run(
    batched: Engine, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every window of a piece has been taken by a batch, the next piece is planned, read
    and queued, so a worker that finishes first finds work: the same segments as piece after
    piece, at most two pieces held at once, and everything given back at the end."""
    engine = batched
    data = (data_dir / LONG).read_bytes()
    host_peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.002):
            host_peak[0] = max(host_peak[0], engine.reservations.total(HOST))

    watcher = threading.Thread(target=watch)
    watcher.start()
    before = engine.stats.pieces_ahead
    try:
        stream = AudioStream(data, max_duration=3600)
        ahead = engine.run(Job(request_id="ahead", audio=stream, source=engine.served))
    finally:
        done.set()
        watcher.join()
    assert engine.stats.pieces_ahead - before >= 2  # 4 pieces: all but the first, mostly
    assert engine.reservations.snapshot() == []

    monkeypatch.setattr(type(engine.pipeline), "_queue_ahead", lambda *a, **k: None)
    stream = AudioStream(data, max_duration=3600)
    one_by_one = engine.run(Job(request_id="in-turn", audio=stream, source=engine.served))
    assert engine.stats.pieces_ahead - before >= 2
    assert [(s.text, s.start, s.end) for s in ahead.segments] == [
        (s.text, s.start, s.end) for s in one_by_one.segments
    ]
    assert [s.id for s in ahead.segments] == list(range(len(ahead.segments)))
    (model,) = engine.pool.loaded()
    shape = engine.planner.requested_shape(
        model, Job(request_id="x", audio=np.zeros(16000 * 60), source=engine.served)
    )
    per_piece = model.cost.estimate(shape).host_bytes(61)
    assert per_piece < host_peak[0] <= 2 * per_piece  # two pieces at once, never three


def test_a_request_cancelled_with_a_piece_queued_ahead_gives_it_all_back(
    batched: Engine, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.errors import RequestCancelledError

    engine = batched
    cancelled = threading.Event()
    queue_ahead = type(engine.pipeline)._queue_ahead

    def then_leave(*args: Any, **kwargs: Any) -> Any:
        queued = queue_ahead(*args, **kwargs)
        if queued is not None:
            cancelled.set()  # the client goes while the next piece waits in the queue
        return queued

    monkeypatch.setattr(type(engine.pipeline), "_queue_ahead", then_leave)
    stream = AudioStream((data_dir / LONG).read_bytes(), max_duration=3600)
    with pytest.raises(RequestCancelledError):
        engine.run(Job(request_id="gone", audio=stream, source=engine.served), cancelled=cancelled)
    assert cancelled.is_set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        engine.reservations.snapshot() or engine.memory_report()["requests"]["queued_windows"]
    ):
        time.sleep(0.05)
    assert engine.reservations.snapshot() == []
    assert engine.memory_report()["requests"]["queued_windows"] == 0
