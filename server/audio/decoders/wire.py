"""The wire between the server and a decoder process: a 4-byte length, a JSON header, then
as many raw bytes as the header's ``nbytes`` says (int16 samples, or an upload held in memory).
Never ``pickle``: what a decoder sends is data, checked before use. An upload on disk goes over
as a file descriptor (``SCM_RIGHTS``) right after the header that says so."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

#: Samples per call, in bytes of int16 output: what a decoder process holds at once.
BLOCK_BYTES = 1 << 20
_HEADER = struct.Struct(">I")
_MAX_HEADER = 64 * 1024


def send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    """One message: ``header`` (with ``nbytes`` set) and ``payload``."""
    raw = json.dumps({**header, "nbytes": len(payload)}).encode()
    sock.sendall(_HEADER.pack(len(raw)) + raw)
    if payload:
        sock.sendall(payload)


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    """Exactly ``size`` bytes.

    Raises:
        EOFError: the other end closed the socket first.
    """
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError("the other end closed the socket")
        got += n
    return buf


def recv(sock: socket.socket, max_payload: int) -> tuple[dict[str, Any], bytearray]:
    """One message: its header and payload.

    Raises:
        EOFError: the other end closed the socket.
        ValueError: the header is too long or not a JSON object, or the payload is larger
            than ``max_payload``.
    """
    (size,) = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    if size > _MAX_HEADER:
        raise ValueError(f"header of {size} bytes")
    header = json.loads(recv_exact(sock, size))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    nbytes = header.get("nbytes", 0)
    if not isinstance(nbytes, int) or not 0 <= nbytes <= max_payload:
        raise ValueError(f"payload of {nbytes!r} bytes")
    return header, recv_exact(sock, nbytes)
