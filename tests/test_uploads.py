"""Uploads spooled to disk (server/audio/upload.py): what stays in memory is counted, what is on disk
is not, the decoders read the file where it lies, and the temporary file is gone once the
request ends, however it ends.

Issue 21: six concurrent 300 MB uploads took 1789 MiB of RSS before the queue or the planner
saw them. Here six 40 MB uploads are held at once (the engine is gated so they all wait) and
the server's resident memory and its upload reservations are read while they wait.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import Any

import httpx
import psutil
import pytest
import requests

from server.audio.decoders import DecoderPool
from server.audio.upload import Upload
from tests.conftest import DATA, LiveServer

MiB = 1 << 20


# ---- the Upload itself -------------------------------------------------------------------------


def spooled(data: bytes) -> SpooledTemporaryFile[bytes]:
    """A file part as Starlette's parser leaves it (in memory up to 1 MiB, then on disk)."""
    file: SpooledTemporaryFile[bytes] = SpooledTemporaryFile(max_size=1 << 20)
    file.write(data)
    file.seek(0)
    return file


def test_a_small_upload_is_held_in_memory_and_counted() -> None:
    data = os.urandom(200_000)
    with spooled(data) as file, Upload.take_over(file) as upload:
        assert not upload.on_disk and upload.memory_bytes == len(data) == upload.size
        assert upload.reader().read() == data and upload.read_at(10, 5) == data[10:15]


def test_a_large_upload_stays_in_its_file_and_is_not_counted() -> None:
    data = os.urandom(3 * MiB)
    with spooled(data) as file:
        upload = Upload.take_over(file)
    # The form closed its file; the upload still reads it, from disk.
    with upload:
        assert upload.on_disk and upload.size == len(data)
        assert upload.memory_bytes == (len(data) if _tmp_in_ram() else 0)
        a, b = upload.reader(), upload.reader()
        assert a.read(100) == data[:100]
        assert b.read(50) == data[:50]  # each reader keeps a position of its own
        a.seek(-10, os.SEEK_END)
        assert a.read() == data[-10:] and b.read(50) == data[50:100]
        fd = upload.fileno()
        assert fd is not None
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, and with it the only link to the unlinked file


def _tmp_in_ram() -> bool:
    from server.audio.upload import temp_dir_in_ram

    return temp_dir_in_ram()


# ---- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LiveServer], tiny_model: Path) -> LiveServer:
    return server_factory(model=str(tiny_model), max_queue=16)


def silent_wav(path: Path, megabytes: int) -> Path:
    """A WAV of about ``megabytes`` of silence (8 channels at 192 kHz: big, and quick to
    transcribe)."""
    frames = megabytes * MiB // 16
    with wave.open(str(path), "wb") as out:
        out.setnchannels(8)
        out.setsampwidth(2)
        out.setframerate(192000)
        out.writeframes(bytes(frames * 16))
    return path


def temp_files(pids: list[int]) -> set[str]:
    """Unlinked files in the temporary directory that these processes hold open, apart from
    the ones pytest captures output in (every process here has those as stdout and stderr)."""
    where = os.path.realpath(tempfile.gettempdir())
    found = set()
    for pid in pids:
        with_fds = Path(f"/proc/{pid}/fd")
        for fd in os.listdir(with_fds) if with_fds.exists() else ():
            try:
                target = os.readlink(with_fds / fd)
            except OSError:
                continue
            # Spooled files are unlinked at once: "/tmp/#123 (deleted)".
            if target.startswith(where + "/") and target.endswith(" (deleted)"):
                found.add(target)
    return found - _captured()


def _captured() -> set[str]:
    """pytest's capture files: what this process has as stdout and stderr."""
    targets = set()
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def server_pids(server: LiveServer) -> list[int]:
    pool: DecoderPool = server.app.state.decoders
    return [os.getpid(), *pool.pids()]


def wait_for(condition: Callable[[], bool], timeout: float = 120.0, what: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what() if callable(what) else what}"
        time.sleep(0.05)


class Gate:
    """Holds every request at the door of the engine until opened, and counts what each
    request counted against host RAM for its form."""

    def __init__(self, server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
        engine = server.engine
        self.open = threading.Event()
        self.held: list[int] = []
        run, hold = engine.run, engine.hold_upload

        def gated_run(*args: Any, **kwargs: Any) -> Any:
            self.open.wait(timeout=300)
            return run(*args, **kwargs)

        def counted_hold(nbytes: int, owner: str, api_key: str | None = None) -> Any:
            self.held.append(nbytes)
            return hold(nbytes, owner, api_key)

        monkeypatch.setattr(engine, "run", gated_run)
        monkeypatch.setattr(engine, "hold_upload", counted_hold)


@pytest.fixture
def gate(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate(server, monkeypatch)
    try:
        yield gate
    finally:
        gate.open.set()


def post_file(server: LiveServer, path: Path, results: list[Any]) -> None:
    """Upload ``path`` streamed from disk (httpx reads it in chunks), as a client would."""
    with path.open("rb") as fh:
        try:
            response = httpx.post(
                f"{server.url}/v1/audio/transcriptions",
                files={"file": ("upload", fh)},
                data={"model": "whisper-1"},
                timeout=300,
            )
            results.append(response)
        except httpx.HTTPError as exc:
            results.append(exc)


def test_concurrent_large_uploads_wait_on_disk_not_in_memory(
    server: LiveServer, gate: Gate, tmp_path: Path
) -> None:
    big = silent_wav(tmp_path / "big.wav", 40)
    gate.open.set()
    requests.post(  # warm: the first request loads what it needs
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("upload", (DATA / "jfk.flac").read_bytes())},
        data={"model": "whisper-1"},
        timeout=120,
    )
    gate.open.clear()
    gate.held.clear()
    before = psutil.Process().memory_info().rss
    results: list[Any] = []
    clients = [threading.Thread(target=post_file, args=(server, big, results)) for _ in range(6)]
    for client in clients:
        client.start()
    wait_for(lambda: len(gate.held) == 6)  # every form is parsed, its upload held
    time.sleep(0.5)
    grown = psutil.Process().memory_info().rss - before
    spooled_files = temp_files(server_pids(server))
    gate.open.set()
    for client in clients:
        client.join(timeout=300)
    assert [getattr(r, "status_code", r) for r in results] == [200] * 6
    # 6 x 40 MB waited at once: on disk, each counted as its text fields only.
    assert grown < 80 * MiB, f"RSS grew {grown / MiB:.0f} MiB holding 240 MB of uploads"
    assert max(gate.held) < 64 * 1024, gate.held
    assert len(spooled_files) >= 6, spooled_files
    wait_for(
        lambda: not temp_files(server_pids(server)), what=lambda: temp_files(server_pids(server))
    )


def test_a_small_upload_is_counted_while_it_is_held(server: LiveServer, gate: Gate) -> None:
    gate.open.set()
    data = (DATA / "jfk.mp3").read_bytes()
    response = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("upload", data)},
        data={"model": "whisper-1"},
        timeout=120,
    )
    assert response.status_code == 200
    assert gate.held[-1] >= len(data)


def test_no_temporary_file_outlives_its_request(
    server: LiveServer, gate: Gate, tmp_path: Path
) -> None:
    """Answered, refused (not audio), abandoned mid-upload, abandoned while waiting: the
    spooled file is gone afterwards, in the server and in its decoder processes."""
    big = silent_wav(tmp_path / "big.wav", 8)
    gate.open.set()
    ok = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("upload", big.read_bytes())},
        data={"model": "whisper-1"},
        timeout=120,
    )
    assert ok.status_code == 200
    refused = requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("upload", os.urandom(3 * MiB))},
        data={"model": "whisper-1"},
        timeout=120,
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_audio"
    wait_for(
        lambda: not temp_files(server_pids(server)), what=lambda: temp_files(server_pids(server))
    )

    # Half an upload, then the client goes away.
    body, boundary = multipart(big.read_bytes())
    with httpx.Client(timeout=60) as client:

        def half() -> Iterator[bytes]:
            yield body[: len(body) // 2]
            raise RuntimeError("the client gives up")

        with pytest.raises(RuntimeError):
            client.post(
                f"{server.url}/v1/audio/transcriptions",
                content=half(),
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            )
    wait_for(
        lambda: not temp_files(server_pids(server)), what=lambda: temp_files(server_pids(server))
    )

    # A whole upload that waits at the engine, and a client that hangs up meanwhile.
    gate.open.clear()
    gate.held.clear()
    results: list[Any] = []
    with httpx.Client(timeout=httpx.Timeout(60, read=2.0)) as client:
        try:
            client.post(
                f"{server.url}/v1/audio/transcriptions",
                content=body,
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            )
        except httpx.ReadTimeout as exc:
            results.append(exc)
    assert gate.held and results
    assert temp_files(server_pids(server))  # still waiting, and still on disk
    gate.open.set()
    wait_for(
        lambda: not temp_files(server_pids(server)), what=lambda: temp_files(server_pids(server))
    )
    wait_for(lambda: server.engine.reservations.snapshot() == [])


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "b0undary21"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary
