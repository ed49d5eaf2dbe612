"""A decoder process: ``python -m server.audio.decoders.process FD`` answers the server's calls on the
socket ``FD`` until the server closes it. It imports PyAV and NumPy through
:mod:`server.audio.decode` and nothing that loads a model."""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import socket
import sys
from dataclasses import asdict
from typing import Any

import numpy as np

from server.audio.decode import SAMPLE_RATE, AudioStream
from server.audio.decoders.wire import BLOCK_BYTES, recv, send
from server.audio.upload import Upload
from server.errors import AudioError

logger = logging.getLogger(__name__)

#: Data memory (heap and private mappings) a decoder process may take: about 60 MiB idle, and
#: decoding a block needs a few more.
DATA_LIMIT = 1 << 30


def _state(stream: AudioStream) -> dict[str, Any]:
    return {
        "info": asdict(stream.info),
        "finished": stream.finished,
        "duration": stream.duration,
        "decoded_seconds": stream.decoded_seconds,
    }


def _error_reply(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, AudioError):
        return {"error": {"kind": "audio", "code": exc.code, "message": exc.message}}
    logger.exception("decoder process: unexpected error")
    return {"error": {"kind": type(exc).__name__, "message": str(exc)}}


def serve(sock: socket.socket) -> None:
    """Answer the server's calls on ``sock`` until it closes (the decoder process's loop)."""
    streams: dict[int, tuple[AudioStream, Upload]] = {}

    def forget(stream_id: int) -> None:
        stream, upload = streams.pop(stream_id)
        stream.close()
        upload.close()

    def open_stream(stream_id: int, header: dict[str, Any], upload: Upload) -> AudioStream:
        if stream_id in streams:  # opened again after its process was lost: start over
            forget(stream_id)
        try:
            stream = AudioStream(
                upload,
                max_duration=float(header["max_duration"]),
                sample_rate=int(header["sample_rate"]),
                channel=header["channel"],
            )
        except BaseException:
            upload.close()
            raise
        streams[stream_id] = (stream, upload)
        return stream

    def read(stream: AudioStream, n: int) -> np.ndarray:
        # At most BLOCK_BYTES a call, however many channels a sample has.
        rows = max(1, BLOCK_BYTES // (2 * max(1, stream.width())))
        return stream.read_int16(min(n, rows))

    def skip(stream: AudioStream, n: int) -> None:
        while n > 0 and not stream.finished:
            n -= len(stream.read_int16(min(n, SAMPLE_RATE * 30)))

    while True:
        try:
            header, payload = recv(sock, 1 << 30)
        except EOFError:
            return
        # An upload on disk comes as a descriptor right after its header.
        upload = None
        if header.get("op") == "open":
            if header.get("fd"):
                upload = Upload(fd=socket.recv_fds(sock, 1, 1)[1][0])
            else:
                upload = Upload(payload)
        reply: dict[str, Any] = {}
        data = b""
        stream: AudioStream | None = None
        try:
            if header.get("op") == "ping":
                send(sock, {})
                continue
            if header.get("op") == "close":  # sent without waiting for an answer
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    forget(int(header["id"]))
                continue
            stream_id = int(header["id"])
            if upload is not None:
                stream = open_stream(stream_id, header, upload)
            elif stream_id in streams:
                stream = streams[stream_id][0]
                if header.get("op") == "read":
                    samples = read(stream, int(header["n"]))
                    reply["shape"] = list(samples.shape)
                    data = samples.tobytes()
                elif header.get("op") == "skip":
                    skip(stream, int(header["n"]))
                else:
                    raise ValueError(f"unknown call {header.get('op')!r}")
            else:
                raise ValueError(f"no stream {stream_id}")
        except Exception as exc:
            reply = _error_reply(exc)
            data = b""
        if stream is not None:
            reply["state"] = _state(stream)
        send(sock, reply, data)


def main(argv: list[str]) -> None:
    """``python -m server.audio.decoders.process FD``: a decoder process serving the socket ``FD``."""
    logging.basicConfig(level=logging.WARNING, format="decoder %(process)d: %(message)s")
    with contextlib.suppress(ValueError, OSError):  # not every platform caps data memory
        resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))
    # Ctrl-C and SIGTERM sent to the whole process group are the server's to handle: it
    # finishes its requests (which may still read from here), then closes the socket, and this
    # process ends with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    sock.setblocking(True)
    serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
