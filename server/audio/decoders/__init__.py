"""Decoding uploads in processes of their own, so that no file can take the server down.

FFmpeg parses every byte a client sends, in native code. A fault there (a crash on a crafted
file, a decoder that never returns, an allocation that runs away) inside the server process
would end every request at once, or hold a thread for good. Here each upload is decoded in one
of ``WHISPER_DECODE_WORKERS`` small processes that import nothing but PyAV and NumPy
(:mod:`server.audio.decode`); the server reads samples from them as it needs them, a block at a time.

When a decoder process dies (or a call to it runs past :data:`CALL_TIMEOUT_S` and it is killed):

- the request whose call was in flight gets a 400 ``decoder_failed`` (only one call runs in a
  process at a time, so that is the file that did it);
- every other stream that lived in that process is opened again in its replacement on its
  next call, and the samples it already handed out are decoded again and dropped, so those
  requests go on as if nothing happened;
- the process is started again on the next call.

The wire between them is a socket pair: a length-prefixed JSON header and raw int16 samples,
never ``pickle``, so that even a decoder taken over by a hostile file can only send back wrong
samples, which are checked (shape, size) before use. An upload on disk is handed over as a file
descriptor (``SCM_RIGHTS``), one in memory as its bytes. Each process caps its own data memory
(``process.DATA_LIMIT``), so a decompression bomb fails its request instead of eating the host.

``pool`` is the server's side (the processes, and streams read from them), ``process`` the
decoder process's loop, ``wire`` the messages between them.
"""

from server.audio.decoders.pool import (
    CALL_TIMEOUT_S,
    START_TIMEOUT_S,
    DecoderLost,
    DecoderPool,
    DecoderStream,
    worker_command,
)
from server.audio.decoders.wire import BLOCK_BYTES

__all__ = [
    "BLOCK_BYTES",
    "CALL_TIMEOUT_S",
    "START_TIMEOUT_S",
    "DecoderLost",
    "DecoderPool",
    "DecoderStream",
    "worker_command",
]
