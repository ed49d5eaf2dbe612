"""The bad-input corpus (``tests/bad_inputs/cases.json``) against a real server on loopback.

Every case is sent as raw bytes built here (so repeated fields, bytes that are not UTF-8, odd
file names and broken bodies go out exactly as written), and every answer must be the expected
status with OpenAI's error envelope on a 4xx/5xx and an ``x-request-id``. ``/health`` must
answer 200 after each case, and no request may leave a file behind: nothing in the request is
ever a filesystem path.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import LiveServer

TESTS = Path(__file__).parent
CORPUS = TESTS / "bad_inputs"
CASES: list[dict[str, Any]] = json.loads((CORPUS / "cases.json").read_text())["cases"]
BOUNDARY = "bad-inputs-7c0f4e1d"
# Where a file name used as a path would land; none of these may exist after a case.
SENTINELS = (
    Path("/tmp/whisper_bad_inputs_sentinel.wav"),
    Path("../../../whisper_bad_inputs_sentinel.wav"),
    Path("whisper_bad_inputs_sentinel.wav"),
)
SMALL_UPLOAD = "64KiB"


@pytest.fixture(scope="module")
def servers(
    tiny_server: LiveServer, server_factory: Callable[..., LiveServer], tiny_model: Path
) -> dict[str, LiveServer]:
    return {
        "default": tiny_server,
        "small_upload": server_factory(model=str(tiny_model), max_upload_size=SMALL_UPLOAD),
    }


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = (Path(dirpath) / name).stat()
            out[os.path.relpath(Path(dirpath) / name, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def untouched(servers: dict[str, LiveServer], tiny_model: Path) -> Iterator[Callable[[], None]]:
    """A check that the model folders and the sentinel paths are as they were."""
    roots = [tiny_model, *(s.settings.models_dir for s in servers.values())]
    before = {root: _tree(root) for root in roots}
    for sentinel in SENTINELS:
        assert not sentinel.exists(), f"remove {sentinel} before running the corpus"

    def check() -> None:
        for root in roots:
            assert _tree(root) == before[root], f"{root} changed"
        for directory in roots:
            for sentinel in SENTINELS:
                assert not (directory / sentinel).exists()
        for sentinel in SENTINELS:
            assert not sentinel.exists(), f"a request created {sentinel.resolve()}"

    yield check
    check()


# ---- building requests -------------------------------------------------------------------------


def _bytes(spec: dict[str, Any], key: str, context: dict[str, str]) -> bytes:
    if f"{key}_base64" in spec:
        return base64.b64decode(spec[f"{key}_base64"])
    if key == "value" and "value_from" in spec:
        return context[spec["value_from"]].encode()
    text = spec[key] * spec.get(f"{key}_repeat", 1)
    return text.encode()


def _fields(case: dict[str, Any], context: dict[str, str]) -> list[tuple[bytes, bytes]]:
    out = []
    for spec in case.get("fields", []):
        name, value = _bytes(spec, "name", context), _bytes(spec, "value", context)
        for i in range(spec.get("repeat", 1)):
            out.append((name.replace(b"{i}", str(i).encode()), value))
    return out


def _multipart(fields: list[tuple[bytes, bytes]], files: list[dict[str, Any]]) -> bytes:
    """A multipart/form-data body, byte for byte as written (no escaping of names)."""
    dash = b"--" + BOUNDARY.encode()
    parts = []
    for name, value in fields:
        parts.append(
            dash + b'\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value
        )
    for spec in files:
        if "filename_base64" in spec:
            filename = base64.b64decode(spec["filename_base64"])
        else:
            filename = spec.get("filename", "upload").encode()
        disposition = b'form-data; name="' + spec["field"].encode() + b'"'
        if not spec.get("no_filename"):
            disposition += b'; filename="' + filename + b'"'
        content_type = spec.get("content_type", "application/octet-stream").encode()
        parts.append(
            dash
            + b"\r\nContent-Disposition: "
            + disposition
            + b"\r\nContent-Type: "
            + content_type
            + b"\r\n\r\n"
            + (TESTS / spec["source"]).read_bytes()
        )
    return b"\r\n".join([*parts, dash + b"--"]) + b"\r\n"


def _chunks(body: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def send(server: LiveServer, case: dict[str, Any], context: dict[str, str]) -> requests.Response:
    """Send one case as its manifest entry describes it."""
    url = server.url + case.get("path", "/v1/audio/transcriptions")
    method = case.get("method", "POST")
    if method == "GET":
        return requests.get(url, timeout=60)
    encoding = case.get("encoding", "multipart")
    headers: dict[str, str] = {}
    body: bytes
    if encoding == "json":
        body = json.dumps(case["json"]).encode()
        headers["Content-Type"] = "application/json"
    elif encoding == "urlencoded":
        body = urllib.parse.urlencode(_fields(case, context)).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif encoding == "raw":
        if "body_source" in case:
            body = (TESTS / case["body_source"]).read_bytes()
        else:
            body = base64.b64decode(case["body_base64"])
    else:
        body = _multipart(_fields(case, context), case.get("files", []))
        headers["Content-Type"] = f"multipart/form-data; boundary={BOUNDARY}"
    if "content_type" in case:
        headers["Content-Type"] = case["content_type"]
    data: bytes | Iterator[bytes] = _chunks(body) if case.get("chunked") else body
    return requests.request(method, url, data=data, headers=headers, timeout=120)


# ---- checking answers --------------------------------------------------------------------------


def check_answer(resp: requests.Response, expect: dict[str, Any]) -> None:
    assert resp.status_code == expect["status"], resp.text[:500]
    assert resp.headers.get("x-request-id"), "no x-request-id header"
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == (
            "server_error" if resp.status_code >= 500 else "invalid_request_error"
        )
        for key in ("param", "code"):
            if key in expect:
                assert error[key] == expect[key], error
        assert len(error["message"]) <= expect.get("max_message_chars", 2000), error
        assert expect.get("message_excludes", "\0") not in error["message"], error
    else:
        text = resp.text.lower()
        for word in expect.get("text_contains", []):
            assert word in text, resp.text[:500]
        if "content_type" in expect:
            assert resp.headers["content-type"].startswith(expect["content_type"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(
    case: dict[str, Any],
    servers: dict[str, LiveServer],
    tiny_model: Path,
    untouched: Callable[[], None],
) -> None:
    server = servers[case.get("server", "default")]
    context = {
        "tiny_model_path": str(tiny_model),
        "tiny_model_relative": os.path.relpath(tiny_model, server.settings.models_dir),
    }
    resp = send(server, case, context)
    check_answer(resp, case["expect"])
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    if case.get("path_like"):
        untouched()


def test_corpus_is_complete() -> None:
    """At least 30 cases, unique names, every file sent exists and every generated file is sent."""
    names = [c["name"] for c in CASES]
    assert len(names) >= 30 and len(names) == len(set(names))
    sources = {spec["source"] for c in CASES for spec in c.get("files", [])}
    sources |= {c["body_source"] for c in CASES if "body_source" in c}
    for source in sources:
        assert (TESTS / source).is_file(), source
    generated = {
        f"bad_inputs/{p.name}" for p in CORPUS.iterdir() if p.suffix not in (".py", ".json")
    }
    assert generated <= sources, f"files no case sends: {sorted(generated - sources)}"


def test_long_values_are_quoted_by_their_start(servers: dict[str, LiveServer]) -> None:
    """A 5 kB model id in the path (GET, POST and DELETE /v1/models/{id}) and a 5 kB unknown
    route: the 404's message quotes the first characters and says how long the value was."""
    server = servers["default"]
    model = "m" * 5000
    for method in ("GET", "POST", "DELETE"):
        resp = requests.request(method, f"{server.url}/v1/models/{model}", timeout=30)
        check_answer(resp, {"status": 404, "param": "model", "code": "model_not_found"})
        message = resp.json()["error"]["message"]
        assert "m" * 60 not in message and "(5000 characters)" in message, message
    resp = requests.get(f"{server.url}/{'r' * 5000}", timeout=30)
    check_answer(resp, {"status": 404, "max_message_chars": 200})


# ---- clients that go away ------------------------------------------------------------------------


def _requests_with_status(server: LiveServer, status: int) -> float:
    """The server's own count of transcription requests answered with ``status``."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    series = f'whisper_requests_total{{route="/v1/audio/transcriptions",status="{status}"}}'
    found = re.search(re.escape(series) + r" (\S+)", text)
    return float(found.group(1)) if found else 0.0


def _wait_idle(server: LiveServer, timeout: float = 30.0) -> float:
    """Seconds until no request is admitted any more."""
    started = time.monotonic()
    while server.app.state.admission.depth and time.monotonic() - started < timeout:
        time.sleep(0.1)
    return time.monotonic() - started


def test_client_gone_mid_upload(
    servers: dict[str, LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up half way through its upload is the client's doing: 499, not a
    500, and no error logged with a traceback."""
    server = servers["default"]
    errors_before = _requests_with_status(server, 500)
    gone_before = _requests_with_status(server, 499)
    port = int(server.url.rsplit(":", 1)[1])
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        "Content-Length: 1000000\r\n\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    ).encode()
    with caplog.at_level(logging.ERROR, logger="server"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b"\0" * 4096)
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            counted = _requests_with_status(server, 500) + _requests_with_status(server, 499)
            if counted > errors_before + gone_before:
                break
            time.sleep(0.1)
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert _wait_idle(server) < 5
    assert _requests_with_status(server, 500) == errors_before, (
        "a client that went away mid-upload was counted as a 500"
    )
    assert _requests_with_status(server, 499) == gone_before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]


def _upload(port: int, chunks: list[bytes], pause: float, total: int | None = None) -> bytes:
    """POST a multipart upload of ``chunks`` (the file's bytes) with ``pause`` seconds between
    them, announcing ``total`` body bytes (the real length by default), and return the raw
    response once the server closes the connection or 30 s pass."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="jfk.flac"\r\n\r\n'
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = total if total is not None else len(head) + sum(map(len, chunks)) + len(tail)
    request = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request + head)
        for chunk in chunks:
            time.sleep(pause)
            sock.sendall(chunk)
        if total is None:
            sock.sendall(tail)
        response = b""
        while part := sock.recv(65536):
            response += part
    return response


def test_stalled_upload_gets_408(
    server_factory: Callable[..., LiveServer], tiny_model: Path, data_dir: Path
) -> None:
    """A client that stops sending mid-body is answered 408 after the idle timeout, not held
    for the whole request timeout; the server stays healthy."""
    server = server_factory(model=str(tiny_model), upload_idle_timeout=1.0)
    port = int(server.url.rsplit(":", 1)[1])
    audio = (data_dir / "jfk.flac").read_bytes()
    timed_out_before = _requests_with_status(server, 408)
    started = time.monotonic()
    # Announce the whole file, send a quarter of it, then go quiet.
    response = _upload(port, [audio[: len(audio) // 4]], pause=0.0, total=len(audio) + 1000)
    waited = time.monotonic() - started
    status_line, _, rest = response.partition(b"\r\n")
    assert b" 408 " in status_line, response[:300]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "upload_timeout"
    assert body["error"]["type"] == "invalid_request_error"
    assert "WHISPER_UPLOAD_IDLE_TIMEOUT" in body["error"]["message"]
    assert waited < 10, waited
    assert _requests_with_status(server, 408) == timed_out_before + 1
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert _wait_idle(server) < 5


def test_slow_steady_upload_is_not_cut_off(
    server_factory: Callable[..., LiveServer], tiny_model: Path, data_dir: Path
) -> None:
    """The timeout is per pause, not for the whole body: an upload that keeps trickling in
    for longer than the timeout in total is transcribed."""
    server = server_factory(model=str(tiny_model), upload_idle_timeout=1.0)
    port = int(server.url.rsplit(":", 1)[1])
    audio = (data_dir / "jfk.flac").read_bytes()
    step = len(audio) // 5 + 1
    chunks = [audio[i : i + step] for i in range(0, len(audio), step)]
    started = time.monotonic()
    response = _upload(port, chunks, pause=0.6)
    assert time.monotonic() - started > 2.5  # longer in total than the 1 s idle timeout
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert b"ask not what your country can do for you" in response


def test_client_gone_mid_transcription(servers: dict[str, LiveServer], data_dir: Path) -> None:
    """A client that gives up while a long file is transcribed frees its slot within seconds
    (the transcription is cancelled, not run to the end for nobody) and is counted as 499."""
    server = servers["default"]
    gone_before = _requests_with_status(server, 499)
    long_audio = (data_dir / "en_ljspeech_LJ001-0001_to_0032_concat.flac").read_bytes()
    with pytest.raises(requests.Timeout):
        requests.post(
            server.url + "/v1/audio/transcriptions",
            data={"model": "whisper-1"},
            files={"file": ("long.flac", long_audio)},
            timeout=(5, 2),
        )
    assert _wait_idle(server) < 15, "the abandoned transcription kept running"
    assert _requests_with_status(server, 499) == gone_before + 1
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
