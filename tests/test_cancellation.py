"""Cancellation, at every point a client can go away: nothing a request held outlives it.

A request holds an admission slot, its upload counted against host RAM, its open audio, the
engine's reservations for the piece it decodes, and a share of the batch its windows run in.
Each is owned by a scope that closes on every exit (``server.api.work``, the engine's ``with``
blocks, the scheduler's pairing of ``max_batch`` with ``around_batch``). These tests cancel
requests where each of those is held and check that ``/v1/memory`` comes back to where it was.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from faster_whisper import WhisperModel
from websockets.sync.client import connect

from server.audio.decode import decode_audio
from server.batching.scheduler import BatchKey, Scheduler, WindowOptions
from server.config import Settings
from server.errors import RequestCancelledError
from server.memory.batch_budget import BatchBudget
from server.realtime.input import InputAudio
from server.realtime.transcriber import Transcriber
from server.request import Job
from tests.conftest import LiveServer, free_port, make_engine, pin_footprint_to_weights, run_server

SR = 16000
LONG = "en_ljspeech_LJ001-0001_to_0032_concat.flac"  # 231 s: many windows, several batches
SHORT = ("jfk.flac", "en_leopard_test.wav")
LIMIT = 2 << 30  # WHISPER_HOST_MEMORY_LIMIT: tight enough that requests wait for memory


# ---- the scheduler and the engine --------------------------------------------------------------


def test_a_batch_sized_for_cancelled_windows_still_closes_its_scope(
    tiny_model: Path, data_dir: Path
) -> None:
    """The client goes while its batch is being sized (the engine reserves for the batch in
    ``max_batch``): no window is left to take, and the batch's scope still opens and closes
    (size 0), so what ``max_batch`` reserved is given back."""
    audio = decode_audio((data_dir / "jfk.flac").read_bytes(), max_duration=60).samples
    gone = threading.Event()
    opened: list[BatchKey] = []
    closed: list[int] = []

    def max_batch(key: BatchKey) -> int:
        opened.append(key)
        gone.set()  # the client goes while the batch is planned (waiting for memory, say)
        return 4

    @contextmanager
    def around_batch(key: BatchKey, size: int) -> Iterator[None]:
        yield
        closed.append(size)

    tiny = WhisperModel(str(tiny_model), device="cpu", compute_type="int8")
    options = WindowOptions(beam_size=1, temperatures=(0.0,))
    with Scheduler(tiny, max_batch=max_batch, around_batch=around_batch) as scheduler:
        ticket = scheduler.submit(audio, options, cancelled=gone)
        with pytest.raises(RequestCancelledError):
            list(ticket)
        deadline = time.monotonic() + 10
        while len(closed) < len(opened) and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = scheduler.stats()
    assert opened and closed == [0] * len(opened), (opened, closed)
    assert stats.batches == 0 and stats.queued_windows == 0
    assert stats.cancelled_windows == ticket.windows


def test_the_engine_releases_a_batch_planned_for_a_cancelled_request(
    tiny_model: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's side of the same moment: its batch reservation (taken in the batch
    budget's ``max_batch``, handed to its ``batch`` scope) is released, not left in the ledger
    for good."""
    engine = make_engine(tiny_model, tmp_path, batching="on", batch_size=2)
    try:
        cancelled = threading.Event()
        plan_batch = BatchBudget.max_batch

        def max_batch(budget: BatchBudget, key: BatchKey, ready: int) -> int:
            size = plan_batch(budget, key, ready)
            cancelled.set()  # reserved for the batch; now the client goes
            return size

        monkeypatch.setattr(BatchBudget, "max_batch", max_batch)
        audio = decode_audio((data_dir / LONG).read_bytes(), max_duration=3600).samples
        assert engine.served is not None
        job = Job(request_id="gone", audio=audio[: 90 * SR], source=engine.served)
        with pytest.raises(RequestCancelledError):
            engine.run(job, cancelled=cancelled)
        deadline = time.monotonic() + 10
        while engine.reservations.snapshot() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.reservations.snapshot() == []
        assert engine.memory_report()["requests"]["queued_windows"] == 0
    finally:
        engine.close()


# ---- a live server, clients leaving at random points ------------------------------------------


def _multipart(fields: dict[str, str], name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "cancellation-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class _Client:
    """One raw HTTP client on its own socket, so that it can leave at any byte."""

    def __init__(self, server: LiveServer, name: str, data: bytes, *, stream: bool) -> None:
        fields = {"model": "whisper-1", "stream": "true" if stream else "false"}
        body, content_type = _multipart(fields, name, data)
        self.head = (
            "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.body = body
        port = int(server.url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)

    def send(self, fraction: float = 1.0) -> None:
        self.sock.sendall(self.head + self.body[: int(len(self.body) * fraction)])

    def read_until(self, marker: bytes) -> bytes:
        """What arrives until ``marker`` (or the server closes)."""
        seen = b""
        while marker not in seen:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            seen += chunk
        return seen

    def close(self) -> None:
        self.sock.close()


def _leave(server: LiveServer, data: dict[str, bytes], case: tuple[str, str, bool, float]) -> str:
    """Run one client that leaves at ``point``; returns what it saw, for the failure message."""
    point, name, stream, at = case
    client = _Client(server, name, data[name], stream=stream)
    try:
        if point == "upload":  # part of the body, then gone
            client.send(at)
            return "left mid-upload"
        client.send()
        if point in ("queued", "decoding"):
            time.sleep(at)
            return f"left after {at:.2f} s"
        if point == "first_event":
            head = client.read_until(b"data:")
            return head.split(b"\r\n", 1)[0].decode()
        answer = client.read_until(b"transcript.text.done" if stream else b"}")
        return answer.split(b"\r\n", 1)[0].decode()
    finally:
        client.close()


def _realtime_leaves(server: LiveServer, pcm: bytes, at: float) -> str:
    """A live session that commits an utterance and drops the socket while it decodes."""
    with connect(
        server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    ) as ws:
        json.loads(ws.recv(timeout=60))  # session created
        for i in range(0, len(pcm), 48000):
            audio = base64.b64encode(pcm[i : i + 48000]).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        time.sleep(at)
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone, without a close frame
    return "realtime left"


def _cases(rng: random.Random, each: int) -> list[tuple[str, str, bool, float]]:
    """(where the client leaves, file, streamed, when), ``each`` of every point in a random
    order: mostly the long file, which has pieces and windows to be cancelled between; the
    requests that run to their end take a short one."""
    cases = []
    for point in ["upload", "queued", "decoding", "first_event", "complete"] * each:
        stream = point == "first_event" or (point != "upload" and rng.random() < 0.5)
        name = rng.choice(SHORT) if point == "complete" else LONG
        at = {"upload": rng.uniform(0.05, 0.95), "queued": rng.uniform(0.0, 0.3)}.get(
            point, rng.uniform(0.5, 4.0)
        )
        cases.append((point, name, stream, at))
    rng.shuffle(cases)
    return cases


def _memory(server: LiveServer) -> dict[str, Any]:
    return dict(httpx.get(server.url + "/v1/memory", timeout=10).json())


def _free_host_budget(memory: dict[str, Any]) -> int:
    """The planner's host budget on the limit's side: the limit, less what the process holds
    outside reservations (pinned to the weights here), less every reservation."""
    reserved = sum(r["bytes"] for r in memory["reservations"])
    return LIMIT - int(memory["idle_host_bytes"]) - reserved


def _settled(memory: dict[str, Any]) -> bool:
    requests = memory["requests"]
    return (
        not memory["reservations"]
        and requests["in_flight"] == 0
        and requests["running"] == 0
        and requests["waiting_for_memory"] == 0
        and requests["queued_windows"] == 0
    )


@pytest.fixture
def leaving_server(tiny_model: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """tiny.en under a host limit, one sequential slot and small batches, so that requests
    queue behind each other and wait for memory (some past WHISPER_MAX_MEMORY_WAIT, a 503);
    its footprint pinned to its weights."""
    settings = Settings(
        port=free_port(),
        model=str(tiny_model),
        models_dir=tmp_path,
        host_memory_limit=str(LIMIT),
        max_concurrency=1,
        batch_size=2,
        max_memory_wait=3.0,
        # Pieces of 30 s: a cancelled request stops at the next one, and the test's CPU time
        # goes to the points where clients leave, not to decoding a long file they left.
        max_piece_duration=30,
    )
    with run_server(settings, prepare=lambda app: pin_footprint_to_weights(app.state.engine)) as s:
        s.engine.settle()
        yield s


def test_clients_leaving_at_random_points_leave_nothing_held(
    leaving_server: LiveServer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = leaving_server
    caplog.set_level(logging.INFO)
    rng = random.Random(21)
    data = {name: (data_dir / name).read_bytes() for name in (LONG, *SHORT)}
    leaving = decode_audio((data_dir / "jfk.flac").read_bytes(), max_duration=60).samples
    pcm = np.interp(np.arange(0, len(leaving), SR / 24000), np.arange(len(leaving)), leaving)
    pcm24 = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()
    before = _memory(server)
    assert _settled(before), before

    cases = _cases(rng, each=4)
    jobs: list[Callable[[], str]] = [lambda c=c: _leave(server, data, c) for c in cases]
    jobs += [lambda at=at: _realtime_leaves(server, pcm24, at) for at in (0.2, 1.0, 2.0)]
    rng.shuffle(jobs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = []
        for job in jobs:
            futures.append(pool.submit(job))
            time.sleep(rng.uniform(0.0, 0.2))
        seen = [f.result() for f in futures]

    deadline = time.monotonic() + 45
    after = _memory(server)
    while not _settled(after) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _memory(server)
    assert _settled(after), (after["reservations"], after["requests"], seen)
    assert _free_host_budget(after) == _free_host_budget(before)

    # The server is whole: a later request runs at full shape, not degraded by leftovers.
    resp = httpx.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": ("jfk.flac", data["jfk.flac"])},
        data={"model": "whisper-1"},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    assert "ask not what your country" in resp.json()["text"].lower()
    assert "x-whisper-degraded" not in resp.headers

    gc.collect()  # a task left pending is reported when it is collected
    problems = [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncio" or "ended holding" in r.getMessage()
    ]
    assert not problems, problems


def _cancelled_count(server: LiveServer) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("whisper_transcriptions_total")
        and 'outcome="client_closed_request"' in line
    )


def test_a_stream_left_after_its_first_event_is_released_and_counted(
    tiny_server: LiveServer, data_dir: Path
) -> None:
    """The issue's case on its own: a long file streamed, the client reads the first event and
    closes. Its memory comes back, and it is counted as a cancelled request, as a file
    request's disconnect is."""
    before = _cancelled_count(tiny_server)
    client = _Client(tiny_server, LONG, (data_dir / LONG).read_bytes(), stream=True)
    client.send()
    assert b"data:" in client.read_until(b"data:")
    client.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _settled(_memory(tiny_server)) and _cancelled_count(tiny_server) == before + 1:
            break
        time.sleep(0.2)
    memory = _memory(tiny_server)
    assert _settled(memory), (memory["reservations"], memory["requests"])
    assert _cancelled_count(tiny_server) == before + 1


# ---- a live session's own task cancelled ---------------------------------------------------------


def test_a_live_session_cancelled_while_it_stops_still_waits_for_its_decode_and_stays_cancelled() -> (
    None
):
    """The session ends (its client left) while an item is decoded, and its task is cancelled
    (the server shutting down) while it waits for that decode to stop: the decode is told to
    stop and waited for all the same, and the cancellation is not swallowed."""
    told = threading.Event()
    stopped = threading.Event()

    def run(job: Any, *, cancelled: threading.Event) -> Any:
        assert cancelled.wait(30)
        told.set()
        time.sleep(0.5)  # the window it was in
        stopped.set()
        raise RequestCancelledError("stopped")

    async def ignore(event: Any) -> None:
        pass

    async def session() -> None:
        engine: Any = SimpleNamespace(executor=ThreadPoolExecutor(1), run=run)
        metrics: Any = SimpleNamespace()
        settings = Settings()
        audio = InputAudio(engine, settings, metrics, owner="sess", api_key=None, send=ignore)
        transcriber = Transcriber(engine, settings, metrics, audio, session_id="sess", send=ignore)
        transcriber.decoding = SimpleNamespace(  # type: ignore[assignment]
            job=lambda samples, item_id, **_: SimpleNamespace(chinese=None),
            config=SimpleNamespace(logprobs=False),
        )
        async with transcriber.running():
            audio.buffer.append(np.zeros(SR, np.float32))
            await audio.commit(None)  # its final decode starts
            while transcriber._inflight is None:
                await asyncio.sleep(0.01)

    async def main() -> None:
        task = asyncio.create_task(session())
        assert await asyncio.to_thread(told.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert stopped.is_set()

    asyncio.run(main())
