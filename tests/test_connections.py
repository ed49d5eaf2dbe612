"""The connection layer (server/api/connections.py) over real TCP: the header timeout, the
connection cap, /metrics behind the API key, and what the protocol refuses, as the client sees
it and as the server logs it."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import LiveServer

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LiveServer], tiny_model: Path) -> LiveServer:
    """tiny.en with a 1 s header timeout and a 1 s upload idle timeout."""
    return server_factory(
        model=str(tiny_model), header_timeout=HEADER_TIMEOUT, upload_idle_timeout=IDLE_TIMEOUT
    )


def _port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(server)), timeout=10)


def _read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _one_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of the next response on a connection that stays open."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def _assert_envelope(raw: bytes, status: int, code: str) -> dict[str, str]:
    got, headers, body = _parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert headers["x-request-id"]
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code, error
    return headers


def _dribble(sock: socket.socket, start: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send ``start``, then one more byte every ``every`` seconds until the server answers or
    closes; return what it sent and the seconds it took (``limit`` at most)."""
    started = time.monotonic()
    sock.sendall(start)
    sock.settimeout(every)
    while time.monotonic() - started < limit:
        try:
            received = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            continue
        except ConnectionResetError:
            received = b""
        elapsed = time.monotonic() - started
        return received + (_read_until_closed(sock) if received else b""), elapsed
    return b"", time.monotonic() - started


# ---- the header timeout --------------------------------------------------------------------------


def test_dribbled_headers_get_408_and_close(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A request line, then a header dribbled a byte every 0.3 s: the bytes keep arriving, but
    they do not restart the clock, so the connection is answered 408 and closed on time."""
    with caplog.at_level(logging.INFO, logger="server.api.connections"):
        with _connect(server) as sock:
            received, elapsed = _dribble(
                sock, b"GET /health HTTP/1.1\r\nX-Slow: ", every=0.3, limit=10 * HEADER_TIMEOUT
            )
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 2, elapsed
    _assert_envelope(received, 408, "header_timeout")
    assert any(" answered 408 " in r.getMessage() for r in caplog.records), caplog.text
    # The server is fine, and a normal request on a fresh connection works.
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_the_clock_stops_when_the_headers_are_in(server: LiveServer, data_dir: Path) -> None:
    """Headers sent in pieces within the timeout are served, and a body that takes longer than
    the header timeout to arrive is not cut off (the upload has its own idle timeout)."""
    with _connect(server) as sock:
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n\r\n"):
            sock.sendall(piece)
            time.sleep(HEADER_TIMEOUT / 5)
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 200 ")

    audio = (data_dir / "jfk.flac").read_bytes()
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="response_format"\r\n\r\n'
            f"text\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.flac"\r\n\r\n'
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(head)
        step = len(body) // 4 + 1
        for i in range(0, len(body), step):
            time.sleep(HEADER_TIMEOUT * 0.6)
            sock.sendall(body[i : i + step])
        response = _read_until_closed(sock, timeout=60)
    assert time.monotonic() - started > 2 * HEADER_TIMEOUT
    assert response.startswith(b"HTTP/1.1 200 "), response[:300]
    assert b"ask not what your country" in response.lower()


def test_keep_alive_connection(server: LiveServer) -> None:
    """On a keep-alive connection the next request's headers are timed too, from the end of
    the previous response; a connection left idle is closed without an answer."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(request)
        assert _one_response(sock) == (200, b'{"status":"ok"}')
        received, elapsed = _dribble(sock, b"GET /he", every=0.3, limit=10 * HEADER_TIMEOUT)
    assert elapsed < HEADER_TIMEOUT + 2, elapsed
    _assert_envelope(received, 408, "header_timeout")

    with _connect(server) as sock:
        sock.sendall(request)
        assert _one_response(sock) == (200, b'{"status":"ok"}')
        started = time.monotonic()
        assert _read_until_closed(sock) == b"", "an idle connection is closed, not answered"
        assert time.monotonic() - started < HEADER_TIMEOUT + 2


def test_a_silent_connection_is_closed(server: LiveServer) -> None:
    """A client that connects and sends nothing does not keep the connection."""
    with _connect(server) as sock:
        started = time.monotonic()
        assert _read_until_closed(sock) == b""
        assert HEADER_TIMEOUT * 0.8 <= time.monotonic() - started < HEADER_TIMEOUT + 2


def test_a_stalled_upload_frees_its_connection(server: LiveServer) -> None:
    """The 408 for an upload that stalls closes the connection (the rest of the body would only
    be discarded), instead of leaving it to the keep-alive timeout or to a client that sends
    a byte now and then."""
    head = (
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    )
    with _connect(server) as sock:
        started = time.monotonic()
        sock.sendall(head + b"\0" * 1000)
        received = _read_until_closed(sock)
        elapsed = time.monotonic() - started
    status, headers, body = _parse(received)
    assert status == 408 and json.loads(body)["error"]["code"] == "upload_timeout"
    assert headers["connection"] == "close"
    assert IDLE_TIMEOUT * 0.8 <= elapsed < IDLE_TIMEOUT + 2, elapsed


# ---- the body's pace -----------------------------------------------------------------------------

GRACE = 1.0
MIN_RATE = 2000  # bytes a second


@pytest.fixture(scope="module")
def paced(server_factory: Callable[..., LiveServer], tiny_model: Path) -> LiveServer:
    """A 1 s grace, then 2000 bytes a second on average; a 30 s idle timeout (so that only the
    pace can end a body that keeps dribbling); at most 3 connections."""
    return server_factory(
        model=str(tiny_model),
        upload_rate_grace=GRACE,
        upload_min_rate=MIN_RATE,
        upload_idle_timeout=30.0,
        max_connections=3,
    )


_SLOW_HEAD = (
    b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
    b"X-Request-Id: slow-body-test\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n"
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
)


def test_a_dribbled_body_gets_408_whatever_its_idle_gaps(
    paced: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The headers of a 10 MB upload, then a byte every 0.3 s: each byte would restart an idle
    timeout, but the body's deadline only moves by a byte's worth, so after the grace it is
    answered 408 upload_too_slow, under its request id, and closed; the access log says 408."""
    with caplog.at_level(logging.INFO, logger="server"):
        with _connect(paced) as sock:
            received, elapsed = _dribble(sock, _SLOW_HEAD, every=0.3, limit=10 * GRACE + 10)
        headers = _assert_envelope(received, 408, "upload_too_slow")
        assert headers["x-request-id"] == "slow-body-test"
        assert GRACE * 0.8 <= elapsed < GRACE + 3, elapsed
        assert "WHISPER_UPLOAD_MIN_RATE" in json.loads(_parse(received)[2])["error"]["message"]
        deadline = time.monotonic() + 5
        lines: list[str] = []
        while time.monotonic() < deadline and not lines:
            lines = [
                r.getMessage()
                for r in caplog.records
                if r.name == "server.access" and r.getMessage().startswith("slow-body-test")
            ]
            time.sleep(0.05)
    assert lines and lines[0].split()[3] == "408", caplog.text


def test_dribbled_bodies_cannot_hold_the_connection_cap(paced: LiveServer) -> None:
    """As many dribbled uploads as WHISPER_MAX_CONNECTIONS fill the cap (a real request gets
    503 meanwhile), but not for good: each is answered 408 after the grace, and /health and a
    real upload are served again."""
    socks = [_connect(paced) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(_SLOW_HEAD)
        time.sleep(0.2)
        assert requests.get(paced.url + "/health", timeout=5).status_code == 503
        answers: list[bytes] = [b""] * len(socks)
        started = time.monotonic()
        while time.monotonic() - started < GRACE + 10 and not all(answers):
            time.sleep(0.3)
            for i, sock in enumerate(socks):
                if answers[i]:
                    continue
                sock.settimeout(0.01)
                try:
                    answers[i] = sock.recv(65536)
                except TimeoutError:
                    sock.sendall(b"a")
    finally:
        for sock in socks:
            sock.close()
    for answer in answers:
        assert _parse(answer)[0] == 408, answer[:200]
    assert time.monotonic() - started < GRACE + 5
    deadline = time.monotonic() + 5
    status = 0
    while time.monotonic() < deadline and status != 200:
        status = requests.get(paced.url + "/health", timeout=5).status_code
        time.sleep(0.05)
    assert status == 200


def test_a_steady_upload_past_the_grace_is_served(paced: LiveServer, data_dir: Path) -> None:
    """An upload that takes several times the grace, but comes at well over the least rate,
    is transcribed."""
    audio = (data_dir / "jfk.flac").read_bytes()
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--b\r\nContent-Disposition: form-data; name="response_format"\r\n\r\ntext\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.flac"\r\n\r\n'
        + audio
        + b"\r\n--b--\r\n"
    )
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with _connect(paced) as sock:
        sock.sendall(head)
        step = len(body) // 8 + 1
        for i in range(0, len(body), step):
            time.sleep(GRACE / 2)
            sock.sendall(body[i : i + step])
        response = _read_until_closed(sock, timeout=60)
    assert time.monotonic() - started > 3 * GRACE
    assert response.startswith(b"HTTP/1.1 200 "), response[:300]


def test_a_body_left_unread_by_the_app_is_still_paced(
    server_factory: Callable[..., LiveServer], tiny_model: Path
) -> None:
    """A request the app answers without reading its body (no API key: 401) whose client goes
    on dribbling that body: the connection is closed after the grace, not kept for good."""
    server = server_factory(
        model=str(tiny_model),
        api_keys="k1",
        upload_rate_grace=GRACE,
        upload_min_rate=MIN_RATE,
        upload_idle_timeout=30.0,
    )
    with _connect(server) as sock:
        sock.sendall(_SLOW_HEAD)
        assert _one_response(sock)[0] == 401
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < GRACE + 10:
            try:
                sock.sendall(b"a")
                sock.settimeout(0.3)
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    assert closed
    assert time.monotonic() - started < GRACE + 4


# ---- what the protocol refuses -------------------------------------------------------------------


def test_malformed_request_is_answered_in_the_envelope_and_logged(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="server.api.connections"):
        with _connect(server) as sock:
            sock.sendall(b"NOT HTTP AT ALL\x01\r\n\r\n")
            received = _read_until_closed(sock)
    _assert_envelope(received, 400, "malformed_request")
    assert any(" answered 400 " in r.getMessage() for r in caplog.records), caplog.text


def test_oversize_headers_get_431(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="server.api.connections"):
        with _connect(server) as sock:
            # In pieces, so that h11 sees an unfinished head grow past its buffer limit.
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(8):
                    sock.sendall(b"X-Filler: " + b"a" * 8000 + b"\r\n")
                    time.sleep(0.02)
            except (BrokenPipeError, ConnectionResetError):
                pass
            received = _read_until_closed(sock)
    _assert_envelope(received, 431, "headers_too_large")
    assert any(" answered 431 " in r.getMessage() for r in caplog.records), caplog.text


def test_a_body_the_protocol_refuses_is_logged_with_the_status_sent(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked upload whose second chunk is not a chunk: h11 refuses it mid-body, the client
    gets 400, and the app, which only sees the connection go, logs 400 too (not 499)."""
    request_id = "malformed-chunk-test"
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"X-Request-Id: {request_id}\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n"
    ).encode()
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    with caplog.at_level(logging.INFO, logger="server"):
        with _connect(server) as sock:
            sock.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
            time.sleep(0.3)  # the request is in the app, reading its body
            sock.sendall(b"zz\r\nnot a chunk\r\n")
            received = _read_until_closed(sock)
        headers = _assert_envelope(received, 400, "malformed_request")
        assert headers["x-request-id"] == request_id
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [
                r.getMessage()
                for r in caplog.records
                if r.name == "server.access" and r.getMessage().startswith(request_id)
            ]
            if lines:
                break
            time.sleep(0.05)
    assert len(lines) == 1, caplog.text
    assert lines[0].split()[3] == "400", lines[0]


# ---- the connection cap --------------------------------------------------------------------------


def test_connection_cap(server_factory: Callable[..., LiveServer], tiny_model: Path) -> None:
    """With WHISPER_MAX_CONNECTIONS=2 two keep-alive connections are served; a request on a third
    gets 503 too_many_connections in the envelope, with Retry-After, and that connection is
    closed; once a connection goes, new ones are served again."""
    server = server_factory(model=str(tiny_model), max_connections=2)
    host, port = "127.0.0.1", _port(server)
    first, second = http.client.HTTPConnection(host, port), http.client.HTTPConnection(host, port)
    try:
        for conn in (first, second):
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status":"ok"}'
        with socket.create_connection((host, port), timeout=10) as third:
            third.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            headers = _assert_envelope(_read_until_closed(third), 503, "too_many_connections")
        assert int(headers["retry-after"]) >= 1
        second.request("GET", "/health")  # the connections inside the cap still work
        assert second.getresponse().status == 200
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 5
    status = 0
    while time.monotonic() < deadline and status != 200:
        status = requests.get(server.url + "/v1/models", timeout=5).status_code
        time.sleep(0.05)
    assert status == 200


# ---- /metrics and API keys -----------------------------------------------------------------------


def test_metrics_need_the_key_when_keys_are_set(
    server_factory: Callable[..., LiveServer], tiny_model: Path
) -> None:
    server = server_factory(model=str(tiny_model), api_keys="k1")
    bare = requests.get(server.url + "/metrics", timeout=5)
    assert bare.status_code == 401
    assert bare.json()["error"]["code"] == "invalid_api_key"
    assert bare.headers["www-authenticate"] == "Bearer"
    wrong = requests.get(server.url + "/metrics", headers={"Authorization": "Bearer no"}, timeout=5)
    assert wrong.status_code == 401
    keyed = requests.get(server.url + "/metrics", headers={"Authorization": "Bearer k1"}, timeout=5)
    assert keyed.status_code == 200 and "whisper_requests_total" in keyed.text
    for path in ("/health", "/ready"):
        assert requests.get(server.url + path, timeout=5).status_code == 200, path


def test_metrics_public_opens_only_metrics(
    server_factory: Callable[..., LiveServer], tiny_model: Path
) -> None:
    server = server_factory(model=str(tiny_model), api_keys="k1", metrics_public=True)
    resp = requests.get(server.url + "/metrics", timeout=5)
    assert resp.status_code == 200 and "whisper_requests_total" in resp.text
    assert requests.get(server.url + "/v1/models", timeout=5).status_code == 401


def test_the_body_clock_counts_only_time_the_client_is_waited_for() -> None:
    """BodyPace: bytes earn time at the least rate; time held (the server not reading) is not
    counted."""
    from server.api.connections import BodyPace

    pace = BodyPace(grace=10.0, min_rate=1000, now=100.0)
    assert pace.left(105.0) == 5.0
    pace.add(2000)  # two more seconds
    assert pace.left(105.0) == 7.0
    pace.hold(105.0)
    assert pace.left(500.0) == 7.0 and not pace.running
    pace.run(500.0)
    assert pace.left(508.0) == -1.0


def test_a_websocket_outlives_the_body_grace(paced: LiveServer) -> None:
    """The body's clock belongs to HTTP requests: a realtime session upgraded from one (whose
    request h11 still counts as sending its body when it is handed over) stays open past the
    grace."""
    from websockets.sync.client import connect

    url = paced.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    with connect(url, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"].endswith("session.created")
        time.sleep(GRACE + 2)
        ws.send(json.dumps({"type": "no.such.event"}))
        event = json.loads(ws.recv(timeout=10))
    assert event["type"] == "error" and event["error"]["code"] == "unsupported_event", event
