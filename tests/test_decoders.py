"""Decoding in processes of its own (server/audio/decoders/): a decoder that crashes or hangs costs
the request it was reading and nothing else; the other streams it held go on where they were;
its replies are checked, never trusted; and over HTTP the server stays up.

A crash is made real: the decoder process is stopped (SIGSTOP) while a call waits on it, then
sent SIGSEGV and continued, so that it dies exactly as a fault in FFmpeg would take it, in the
middle of a call.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests

import server.audio.decoders.pool as decoder_pool
from server.audio.decode import AudioStream, decode_audio
from server.audio.decoders import DecoderPool
from server.audio.upload import Upload
from server.errors import AudioError
from tests.conftest import DATA, LiveServer

JFK = (DATA / "jfk.flac").read_bytes()


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    pool = DecoderPool(1)
    try:
        yield pool
    finally:
        pool.close()


def in_process(data: bytes) -> np.ndarray:
    return decode_audio(data, max_duration=60).samples


def crash_during_a_call(pool: DecoderPool, call: Callable[[], Any]) -> BaseException | None:
    """Run ``call`` while the (only) decoder process is stopped; once the call waits on it,
    the process gets SIGSEGV. Returns what ``call`` raised."""
    worker = pool._workers[0]
    with worker.lock:
        worker.ensure_running()
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not worker.lock.locked() and time.monotonic() < deadline:  # the call is under way
        time.sleep(0.01)
    time.sleep(0.1)  # it has sent its request and waits for the answer
    os.kill(pid, signal.SIGSEGV)
    os.kill(pid, signal.SIGCONT)
    thread.join(timeout=60)
    return raised[0] if raised else None


def test_a_stream_reads_the_same_samples_as_decoding_here(pool: DecoderPool) -> None:
    with Upload(JFK) as upload, pool.open(upload, max_duration=60) as stream:
        assert stream.info.source_channels == 2 and stream.duration == pytest.approx(11, abs=0.1)
        parts = [stream.read(16000 * 3) for _ in range(5)]
        assert stream.finished
    np.testing.assert_array_equal(np.concatenate(parts), in_process(JFK))


def test_a_crash_fails_the_call_in_flight_and_other_streams_go_on(pool: DecoderPool) -> None:
    with Upload(JFK) as upload:
        innocent = pool.open(upload, max_duration=60)
        culprit = pool.open(upload, max_duration=60)
        head = innocent.read(16000 * 4)
        error = crash_during_a_call(pool, lambda: culprit.read(16000 * 4))
        assert isinstance(error, AudioError) and error.code == "decoder_failed", error
        assert "SIGSEGV" in error.message
        # The innocent stream is opened again in the new process and goes on where it was.
        rest = innocent.read(10**7)
        np.testing.assert_array_equal(np.concatenate([head, rest]), in_process(JFK))
        assert innocent.finished and culprit.finished
        innocent.close()
        culprit.close()
        with pool.open(upload, max_duration=60) as fresh:
            np.testing.assert_array_equal(fresh.read(10**7), in_process(JFK))
    assert pool.lost == 1 and pool.started == 2


def test_a_crash_while_opening_fails_that_open(pool: DecoderPool) -> None:
    with Upload(JFK) as upload:
        error = crash_during_a_call(pool, lambda: pool.open(upload, max_duration=60))
        assert isinstance(error, AudioError) and error.code == "decoder_failed"
        with pool.open(upload, max_duration=60) as stream:
            assert len(stream.read(16000)) == 16000


def test_a_decoder_that_hangs_is_killed_after_the_call_timeout() -> None:
    pool = DecoderPool(1, call_timeout=5.0)
    try:
        with Upload(JFK) as upload:
            stream = pool.open(upload, max_duration=60)
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)  # a decoder stuck in a loop, as far as the server sees
            with pytest.raises(AudioError, match="longer than 5 s") as caught:
                stream.read(16000)
            assert caught.value.code == "decoder_failed"
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
            stream.close()
            with pool.open(upload, max_duration=60) as again:
                assert len(again.read(16000)) == 16000
    finally:
        pool.close()


def test_audio_errors_come_back_with_their_codes(pool: DecoderPool) -> None:
    with Upload(b"not audio at all" * 100) as upload, pytest.raises(AudioError) as caught:
        pool.open(upload, max_duration=60)
    assert caught.value.code == "invalid_audio" and caught.value.param == "file"
    truncated = JFK[: len(JFK) // 2]
    with Upload(truncated) as upload, pool.open(upload, max_duration=60) as stream:
        with pytest.raises(AudioError) as caught:
            stream.read(10**7)
    assert caught.value.code == "truncated_audio"


def test_an_upload_on_disk_is_handed_over_as_a_descriptor(
    pool: DecoderPool, tmp_path: Path
) -> None:
    path = tmp_path / "jfk.flac"
    path.write_bytes(JFK)
    fd = os.open(path, os.O_RDONLY)
    with Upload(fd=fd) as upload, pool.open(upload, max_duration=60) as stream:
        np.testing.assert_array_equal(stream.read(10**7), in_process(JFK))
    # The decoder process lets go of its copy of the descriptor once the stream is closed (the
    # close is sent without waiting for an answer).
    pid = pool.pids()[0]

    def held() -> list[str]:
        # A descriptor may close between the listing and the readlink: that one is not held.
        targets = []
        for n in os.listdir(f"/proc/{pid}/fd"):
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{n}"))
            except FileNotFoundError:
                continue
        return targets

    deadline = time.monotonic() + 30
    while str(path) in held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert str(path) not in held()


# A decoder process that answers every read with something other than what was asked for.
_LIAR = """
import json, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[-1]))
lie = sys.argv[-2]
def recv(n):
    b = b""
    while len(b) < n:
        got = sock.recv(n - len(b))
        if not got:
            sys.exit(0)
        b += got
    return b
def send(header, payload=b""):
    raw = json.dumps({**header, "nbytes": len(payload)}).encode()
    sock.sendall(struct.pack(">I", len(raw)) + raw + payload)
state = {"info": {"format_name": "wav", "declared": 1.0, "source_rate": 16000,
                  "source_channels": 1}, "finished": False, "duration": 1.0,
         "decoded_seconds": 0.0}
while True:
    (size,) = struct.unpack(">I", recv(4))
    header = json.loads(recv(size))
    recv(header["nbytes"])
    if header.get("fd"):
        socket.recv_fds(sock, 1, 1)
    if header["op"] != "read":
        send({"state": state})
    elif lie == "size":
        send({"state": state, "shape": [100]}, b"x" * 10)
    elif lie == "too_many":
        send({"state": state, "shape": [header["n"] + 1]}, b"xx" * (header["n"] + 1))
    elif lie == "pickle":
        import pickle
        raw = pickle.dumps(("os.system", "touch /tmp/pwned"))
        sock.sendall(struct.pack(">I", len(raw)) + raw)
    elif lie == "huge":
        sock.sendall(struct.pack(">I", 1 << 31))
"""


@pytest.mark.parametrize("lie", ["size", "too_many", "pickle", "huge"])
def test_a_decoder_s_replies_are_checked_not_trusted(
    lie: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decoder_pool, "worker_command", lambda: [sys.executable, "-c", _LIAR, lie])
    pool = DecoderPool(1)
    try:
        with Upload(JFK) as upload, pool.open(upload, max_duration=60) as stream:
            with pytest.raises(AudioError) as caught:
                stream.read(1000)
            assert caught.value.code == "decoder_failed"
    finally:
        pool.close()


def test_wide_files_stream_every_channel_in_bounded_blocks(pool: DecoderPool) -> None:
    from tests.media import Media

    data = Media("wav", "pcm_s16le", 64, 16000, "s16", seconds=20.0, separate=True).encode()
    with AudioStream(data, max_duration=60, channel="all") as here:
        want = here.read(10**7)
    with Upload(data) as upload, pool.open(upload, max_duration=60, channel="all") as stream:
        got = stream.read(10**7)
    assert got.shape == (320000, 64)
    np.testing.assert_array_equal(got, want)


def test_closing_the_pool_ends_its_processes() -> None:
    pool = DecoderPool(2)
    pool.start()
    pids = pool.pids()
    assert len(pids) == 2 and pool.resident_bytes() > 10 << 20
    pool.close()
    assert pool.pids() == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_with_no_processes_decoding_happens_here() -> None:
    pool = DecoderPool(0)
    with Upload(JFK) as upload, pool.open(upload, max_duration=60) as stream:
        assert isinstance(stream, AudioStream)
    assert not pool.isolated and pool.resident_bytes() == 0


# ---- over HTTP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LiveServer], tiny_model: Path) -> LiveServer:
    return server_factory(model=str(tiny_model), decode_workers=1)


def transcribe(server: LiveServer, data: bytes, **fields: str) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("upload", data)},
        data={"model": "whisper-1", **fields},
        timeout=120,
    )


def test_a_crashing_decoder_costs_one_request_and_the_server_stays_up(server: LiveServer) -> None:
    pool: DecoderPool = server.app.state.decoders
    answers: list[requests.Response] = []
    error = crash_during_a_call(pool, lambda: answers.append(transcribe(server, JFK)))
    assert error is None
    assert answers[0].status_code == 400, answers[0].text
    body = answers[0].json()["error"]
    assert body["code"] == "decoder_failed" and body["param"] == "file", body
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    again = transcribe(server, JFK)
    assert again.status_code == 200 and "country" in again.json()["text"].lower()
    memory = requests.get(f"{server.url}/v1/memory", timeout=10).json()
    assert memory["reservations"] == [], memory


def test_the_decoder_processes_memory_counts_as_the_server_s(server: LiveServer) -> None:
    engine = server.engine
    pool: DecoderPool = server.app.state.decoders
    own = psutil.Process().memory_info().rss
    assert engine.footprint() >= own + pool.resident_bytes() - (16 << 20)
    assert pool.resident_bytes() > 10 << 20
