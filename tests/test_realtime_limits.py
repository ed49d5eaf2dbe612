"""Live sessions under the server's bounds: what a careless or hostile client sends to
/v1/realtime (huge appends, audio faster than it is transcribed, deeply nested frames, endless
keywords, invalid events to keep a session alive, pages from other origins) gets an ``error``
event or a refusal, is counted against host RAM before it is allocated, and leaves the server
and the session usable. Real server, real tiny.en, raw WebSocket clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from server.config import Settings
from server.realtime.audio import InputDecoder, Resampler
from server.realtime.session import RealtimeSession
from server.request import MAX_KEYWORDS
from tests.conftest import LiveServer, free_port, pin_footprint_to_weights, run_server
from tests.test_realtime import LEOPARD, assert_released, pcm24, raw_recv, ws_url

#: A session without turn detection: the client commits.
MANUAL = {
    "type": "session.update",
    "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
}


def opened(ws: ClientConnection) -> ClientConnection:
    assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    return ws


def append(seconds: float | None = None, *, pcm: bytes | None = None) -> str:
    """An append event of ``pcm`` (or of ``seconds`` of silence at 24 kHz)."""
    if pcm is None:
        pcm = bytes(int((seconds or 0) * 48000))
    return json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    )


def next_error(ws: ClientConnection) -> dict[str, Any]:
    """The next ``error`` event (other events before it are skipped)."""
    while True:
        event = json.loads(ws.recv(timeout=30))
        if event["type"] == "error":
            return event["error"]


def still_serves(ws: ClientConnection) -> None:
    """The session answers the next event as usual."""
    ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
    assert json.loads(ws.recv(timeout=10))["type"] == "input_audio_buffer.cleared"


@contextlib.contextmanager
def decodes_held(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every decode waits until the block exits, so what a session holds stays put."""
    go = threading.Event()
    real = server.engine.run

    def held(*args: Any, **kwargs: Any) -> Any:
        go.wait(timeout=120)
        return real(*args, **kwargs)

    monkeypatch.setattr(server.engine, "run", held)
    try:
        yield
    finally:
        go.set()
        monkeypatch.setattr(server.engine, "run", real)


# ---- the resampler and the decoder ------------------------------------------------------------


def test_resampling_memory_is_linear_in_the_input() -> None:
    # The filter used to be applied to a copy of its 175-sample window for every output sample
    # (a 16 MB append took 3 GB); now each tap adds a view of the input to the outputs.
    x = np.random.default_rng(0).standard_normal(10 * 24000).astype(np.float32)
    tracemalloc.start()
    try:
        out = Resampler(24000)(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(len(out) - 160000) < 100
    assert peak < 4 * x.nbytes, f"{peak / x.nbytes:.1f} times the input"


def test_a_huge_append_decodes_in_slices_the_same_as_at_once() -> None:
    pcm = (np.sin(np.arange(30 * 24000) / 7) * 20000).astype("<i2").tobytes()
    whole = InputDecoder("pcm16")(pcm)
    decoder = InputDecoder("pcm16")
    assert decoder.samples_for(len(pcm)) == len(whole)  # known before decoding
    text = base64.b64encode(pcm).decode()
    tracemalloc.start()
    try:
        pieces = decoder.decode_base64(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.concatenate([p.samples for p in pieces]), whole)
    assert max(len(p.samples) for p in pieces) <= 16000  # 1 s slices
    # What it returns (30 s at 16 kHz, about 1.9 MB), and a slice's working memory.
    assert peak < whole.nbytes + 1_000_000, peak
    with pytest.raises(ValueError):
        decoder.decode_base64("AAAA@AAA")


# ---- over the wire -----------------------------------------------------------------------------


def test_a_16_mb_append_is_refused_from_its_size_before_it_is_decoded(
    tiny_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []
    real = InputDecoder.__call__

    def counted(self: InputDecoder, data: bytes) -> np.ndarray:
        decoded.append(len(data))
        return real(self, data)

    monkeypatch.setattr(InputDecoder, "__call__", counted)
    huge = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 16_000_000})
    with opened(connect(ws_url(tiny_server), max_size=None)) as ws:
        ws.send(huge)  # 250 s of 24 kHz PCM, past the 120 s a session may hold
        error = next_error(ws)
        assert error["code"] == "input_audio_backlog_full", error
        assert "WHISPER_REALTIME_MAX_BACKLOG_SECONDS" in error["message"]
        assert not decoded
        still_serves(ws)
        # Without turn detection an item holds 30 s at most: refused before decoding too.
        ws.send(json.dumps(MANUAL))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"
        ws.send(append(31))
        assert next_error(ws)["code"] == "input_audio_buffer_full"
        assert not decoded
        still_serves(ws)
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    assert_released(tiny_server)


def test_appends_are_decoded_off_the_event_loop(
    tiny_server: LiveServer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_loop: list[bool] = []
    real = Resampler.__call__

    def watched(self: Resampler, samples: np.ndarray) -> np.ndarray:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(self, samples)

    monkeypatch.setattr(Resampler, "__call__", watched)
    with opened(connect(ws_url(tiny_server))) as ws:
        ws.send(append(pcm=pcm24(data_dir / f"{LEOPARD}.wav")))
        events = []
        while not events or events[-1]["type"] != "input_audio_buffer.speech_stopped":
            events.append(json.loads(ws.recv(timeout=30)))
    assert on_loop and not any(on_loop)


def test_audio_sent_faster_than_it_is_transcribed_is_bounded_and_nothing_accepted_is_lost(
    server_factory: Any, tiny_model: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = server_factory(
        model=str(tiny_model), realtime_max_item_seconds=3, realtime_max_backlog_seconds=6
    )
    speech = pcm24(data_dir / f"{LEOPARD}.wav", silence_s=0)[: int(2.5 * 48000)]
    committed, completed, refused = [], [], []
    with opened(connect(ws_url(server))) as ws:
        recv = raw_recv(ws)
        ws.send(json.dumps(MANUAL))
        assert recv()["type"] == "session.updated"
        with decodes_held(server, monkeypatch):  # the server transcribes slower than this
            for i in range(10):  # 25 s: two items fit the 6 s backlog, the rest does not
                ws.send(json.dumps({**json.loads(append(pcm=speech)), "event_id": f"a{i}"}))
                ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": f"c{i}"}))
                event = recv()
                if event["type"] == "input_audio_buffer.committed":
                    committed.append(event["item_id"])
                    continue
                assert event["type"] == "error", event
                error = event["error"]
                assert error["code"] == "input_audio_backlog_full", error
                assert error["event_id"] == f"a{i}"
                assert "WHISPER_REALTIME_MAX_BACKLOG_SECONDS" in error["message"]
                refused.append(i)
                # The commit after it: nothing to commit, said so.
                assert next_error(ws)["code"] == "input_audio_buffer_commit_empty"
            assert len(committed) == 2 and refused == list(range(2, 10))
        # Every item accepted is transcribed.
        while len(completed) < len(committed):
            event = recv()
            if event["type"].endswith("transcription.completed"):
                completed.append(event["item_id"])
        assert completed == committed
        assert "quilter" in event["transcript"].lower()
        # The backlog drained: the session takes audio again.
        ws.send(append(pcm=speech))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        assert recv()["type"] == "input_audio_buffer.committed"
    assert_released(server)


@pytest.fixture(scope="module")
def budget_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with 1 GiB of host RAM, of which only the model's weights are resident."""
    settings = Settings(
        model=str(tiny_model),
        models_dir=tmp_path_factory.mktemp("models"),
        port=free_port(),
        host_memory_limit="1GiB",
        max_memory_wait=0,
    )
    with run_server(settings, prepare=lambda app: pin_footprint_to_weights(app.state.engine)) as s:
        yield s


def test_session_audio_is_counted_against_host_ram_before_it_is_decoded(
    budget_server: LiveServer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = budget_server.engine

    def session_bytes() -> int:
        snapshot = engine.reservations.snapshot()
        return sum(r["bytes"] for r in snapshot if r["owner"].startswith("sess_"))

    speech = pcm24(data_dir / f"{LEOPARD}.wav", silence_s=0)
    with opened(connect(ws_url(budget_server))) as ws:
        recv = raw_recv(ws)
        ws.send(json.dumps(MANUAL))
        assert recv()["type"] == "session.updated"
        fixed = session_bytes()
        with decodes_held(budget_server, monkeypatch):
            ws.send(append(pcm=speech * 3))  # 17.6 s
            ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            assert recv()["type"] == "input_audio_buffer.committed"
            # The committed item waiting for its decode, as 16 kHz float32 (but for the
            # resampler's 2 ms lag).
            item = len(speech) * 3 / 48000 * 16000 * 4
            assert item * 0.99 <= session_bytes() - fixed <= item * 1.01
        while not recv()["type"].endswith("transcription.completed"):
            pass
        deadline = time.monotonic() + 10
        while session_bytes() != fixed:  # settled once it is transcribed
            assert time.monotonic() < deadline, engine.reservations.snapshot()
            time.sleep(0.05)

        # Leave 4 MB of the host budget: a 30 s append (1.9 MB of audio, and 1.9 MB of base64
        # held twice while it is decoded) no longer fits, and is refused; the session goes on.
        with engine.reservations.planning():
            budget = engine.free_budget("cpu")
            assert "limit" in budget.why, budget.why  # the 1 GiB limit binds, not the machine
            ballast = engine.reservations.reserve("host", budget.amount - 4_000_000, "test")
        try:
            ws.send(json.dumps({**json.loads(append(30)), "event_id": "big"}))
            error = next_error(ws)
            assert error["code"] == "insufficient_memory" and error["event_id"] == "big", error
            assert "dropped" in error["message"]
            ws.send(append(1))  # small enough
            still_serves(ws)
        finally:
            ballast.release()
        ws.send(append(30))  # fits again
        still_serves(ws)
    assert_released(budget_server)


def test_a_deeply_nested_frame_gets_an_error_and_the_session_goes_on(
    tiny_server: LiveServer,
) -> None:
    with opened(connect(ws_url(tiny_server))) as ws:
        ws.send("[" * 100_000 + "]" * 100_000)
        error = next_error(ws)
        assert error["code"] == "invalid_json" and "deeply" in error["message"]
        ws.send('{"type": "input_audio_buffer.append", "audio": ' + "[" * 5000 + "]" * 5000 + "}")
        assert next_error(ws)["code"] == "invalid_json"
        still_serves(ws)


def test_a_fault_of_the_server_on_one_event_is_said_and_the_socket_closed_properly(
    tiny_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RealtimeSession._handle

    async def faulty(self: RealtimeSession, event: Any) -> None:
        if getattr(event, "event_id", None) == "boom":
            raise RuntimeError("a bug")
        await real(self, event)

    monkeypatch.setattr(RealtimeSession, "_handle", faulty)
    with opened(connect(ws_url(tiny_server))) as ws:
        still_serves(ws)
        ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "boom"}))
        error = next_error(ws)
        assert error["code"] == "internal_error" and error["type"] == "server_error", error
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert_released(tiny_server)


def test_keywords_and_prompt_have_the_http_endpoints_limits(tiny_server: LiveServer) -> None:
    def update(transcription: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {"transcription": transcription}},
            },
        }

    limit = tiny_server.settings.max_prompt_chars
    with opened(connect(ws_url(tiny_server), max_size=None)) as ws:
        for transcription, what in [
            ({"keywords": ["w"] * 200_000}, f"the limit is {MAX_KEYWORDS}"),
            ({"keywords": ["w"] * (MAX_KEYWORDS + 1)}, f"the limit is {MAX_KEYWORDS}"),
            ({"keywords": ["x" * 30] * 90}, "WHISPER_MAX_PROMPT_CHARS"),
            ({"prompt": "x" * (limit + 1)}, "WHISPER_MAX_PROMPT_CHARS"),
        ]:
            ws.send(json.dumps(update(transcription)))
            error = next_error(ws)
            assert error["code"] == "invalid_value" and what in error["message"], error
        ws.send(json.dumps(update({"keywords": ["Quilter"] * MAX_KEYWORDS})))
        updated = json.loads(ws.recv(timeout=10))
        assert updated["type"] == "session.updated"
        assert len(updated["session"]["audio"]["input"]["transcription"]["keywords"]) == 100


def test_only_audio_and_valid_events_keep_a_session_from_going_idle(
    server_factory: Any, tiny_model: Path
) -> None:
    server = server_factory(model=str(tiny_model), realtime_idle_timeout=3)
    with opened(connect(ws_url(server))) as ws:
        # Valid events keep it open past the timeout...
        for _ in range(6):
            ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "input_audio_buffer.cleared"
            time.sleep(0.5)
        # ...invalid ones do not: each is answered, and the session is closed 3 s after the
        # last valid one.
        started = time.monotonic()
        codes: list[str] = []
        try:
            while time.monotonic() - started < 10 and "session_idle_timeout" not in codes:
                ws.send("not json")
                codes.append(next_error(ws)["code"])
                time.sleep(0.5)
        except ConnectionClosed:  # closed while sending: read what came before the close
            with contextlib.suppress(ConnectionClosed):
                while True:
                    codes.append(next_error(ws)["code"])
        assert codes[-1] == "session_idle_timeout", "invalid events kept the session open"
        assert set(codes[:-1]) == {"invalid_json"}


# ---- origins -------------------------------------------------------------------------------------


def test_pages_from_other_origins_cannot_open_sessions_or_change_state(
    server_factory: Any, tiny_model: Path
) -> None:
    server = server_factory(model=str(tiny_model), allowed_origins="https://captions.example")
    own = server.url  # the page at /ui is served from here
    evil = "https://evil.example"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server), origin=evil)  # type: ignore[arg-type]
    response = refused.value.response
    assert response.status_code == 403
    assert json.loads(response.body)["error"]["code"] == "origin_not_allowed"
    for origin in (own, "https://captions.example", None):  # own page, allowed, not a browser
        with opened(connect(ws_url(server), origin=origin)):  # type: ignore[arg-type]
            pass
    model = server.engine.served.id
    with httpx.Client(base_url=server.url) as http:
        for method, path in [
            ("POST", f"/v1/models/{model}"),
            ("DELETE", "/v1/models/nope"),
            ("POST", "/v1/audio/transcriptions"),
            ("POST", "/v1/audio/translations"),
        ]:
            answer = http.request(method, path, headers={"Origin": evil})
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "origin_not_allowed"
            assert answer.headers["x-request-id"]
        # The same requests from the server's own page, or with no Origin, are served.
        assert http.post(f"/v1/models/{model}", headers={"Origin": own}).status_code == 200
        assert http.post(f"/v1/models/{model}").status_code == 200
        no_file = http.post("/v1/audio/transcriptions", headers={"Origin": own})
        assert no_file.status_code == 400  # reached the route: the file is missing
        # Reads pass (the browser keeps their answers from the page anyway).
        assert http.get("/v1/models", headers={"Origin": evil}).status_code == 200
    assert_released(server)


def test_cors_origins_may_send_what_they_may_read(server_factory: Any, tiny_model: Path) -> None:
    server = server_factory(model=str(tiny_model), cors_origins="https://app.example")
    model = server.engine.served.id
    for origin, status in [("https://app.example", 200), ("https://evil.example", 403)]:
        answer = httpx.post(f"{server.url}/v1/models/{model}", headers={"Origin": origin})
        assert answer.status_code == status, answer.text


def test_allowed_origins_are_checked_when_the_server_starts() -> None:
    assert Settings(allowed_origins="*, http://localhost:3000").allowed_origins == [
        "*",
        "http://localhost:3000",
    ]
    with pytest.raises(ValueError, match="not an origin"):
        Settings(allowed_origins="localhost:3000/app")
