"""The server's side of the decoder processes: the pool that starts them and places streams,
and :class:`DecoderStream`, an audio stream read from one (see ``server.audio.decoders``)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import server
from server.audio.decode import (
    ALL_CHANNELS,
    SAMPLE_RATE,
    AudioInfo,
    AudioStream,
    Channel,
    DecodedAudio,
    read_whole,
    to_float,
)
from server.audio.decoders.wire import BLOCK_BYTES, recv, send
from server.audio.upload import Upload
from server.errors import AudioError

logger = logging.getLogger(__name__)

#: Longest one call to a decoder process may take before the process is killed. A call decodes
#: at most :data:`~server.audio.decoders.wire.BLOCK_BYTES` of samples (half a minute of mono audio),
#: which takes milliseconds; this is for a decoder that loops or blocks.
CALL_TIMEOUT_S = 60.0
#: Longest a new decoder process may take to start (import PyAV) and answer.
START_TIMEOUT_S = 60.0

_FAILED = (
    "The server's audio decoder stopped while reading the uploaded file ({why}), so the file is "
    "most likely corrupt or crafted. Re-encode it (e.g. to FLAC or WAV) and upload it again."
)


def worker_command() -> list[str]:
    """The command that starts a decoder process; the socket's descriptor is appended."""
    return [sys.executable, "-m", "server.audio.decoders.process"]


class DecoderLost(Exception):
    """The decoder process died, was killed, or sent something that is not a valid reply."""


class _Worker:
    """One decoder process and the socket to it. Callers hold :attr:`lock` around a call."""

    def __init__(self, pool: DecoderPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.lock = threading.Lock()
        self.generation = 0  # bumped each time a process is started
        self.streams = 0  # open streams placed here (guarded by the pool's lock)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        # Streams to forget: (stream id, generation), sent by whoever holds the lock next.
        self._closing: list[tuple[int, int]] = []
        self._closing_lock = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """:attr:`lock` for a call; on leaving, the closes that waited for it are sent."""
        with self.lock:
            try:
                yield
            finally:
                self._send_closes()
        self._send_waiting_closes()

    def forget(self, stream_id: int, generation: int) -> None:
        """Close a stream in the process without waiting for it: a request that ends (on the
        event loop) never waits behind another request's call."""
        with self._closing_lock:
            self._closing.append((stream_id, generation))
        self._send_waiting_closes()

    def _send_waiting_closes(self) -> None:
        while self._closing and self.lock.acquire(blocking=False):
            try:
                self._send_closes()
            finally:
                self.lock.release()

    def _send_closes(self) -> None:
        """Send the waiting closes (the caller holds :attr:`lock`); they get no answer."""
        with self._closing_lock:
            closing, self._closing = self._closing, []
        for stream_id, generation in closing:
            if generation == self.generation and self._sock is not None and self.pid is not None:
                try:
                    send(self._sock, {"op": "close", "id": stream_id})
                except OSError:
                    return  # the process is gone, and with it what the stream held

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def ensure_running(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._reap()
        parent, child = socket.socketpair()
        env = {
            **os.environ,
            # The worker imports the same `server` package as the server, wherever it lives.
            "PYTHONPATH": os.pathsep.join(
                p
                for p in (str(Path(server.__file__).parent.parent), os.environ.get("PYTHONPATH"))
                if p
            ),
            # NumPy's BLAS threads would only take memory: a decoder does no linear algebra.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        try:
            self._proc = subprocess.Popen(
                [*worker_command(), str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._sock = parent
        self.generation += 1
        self.pool.started += 1
        # Wait for it to answer (it imports PyAV first): a slow start is not a slow call.
        parent.settimeout(START_TIMEOUT_S)
        try:
            send(parent, {"op": "ping"})
            recv(parent, 0)
        except (OSError, EOFError, ValueError) as exc:
            why = self._exit_reason() or f"no answer: {exc}"
            self.kill()
            raise DecoderLost(f"it did not start: {why}") from exc
        parent.settimeout(self.pool.call_timeout)
        logger.debug("decoder %d: started process %d", self.index, self._proc.pid)

    def call(
        self,
        header: dict[str, Any],
        payload: bytes = b"",
        *,
        fd: int | None = None,
        max_reply: int = 0,
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request and wait for its reply (the caller holds :attr:`lock`).

        Raises:
            DecoderLost: the process died, ran out of time (it is killed) or replied nonsense.
        """
        self.ensure_running()
        assert self._sock is not None
        try:
            send(self._sock, {**header, "fd": fd is not None}, payload)
            if fd is not None:
                socket.send_fds(self._sock, [b"F"], [fd])
            return recv(self._sock, max_reply)
        except TimeoutError as exc:
            self.kill()
            raise DecoderLost(f"it took longer than {self.pool.call_timeout:g} s") from exc
        except (OSError, EOFError, ValueError) as exc:  # ValueError: JSON or framing
            why = self._exit_reason()
            self.kill()
            raise DecoderLost(why or f"it sent an invalid reply: {exc}") from exc

    def _exit_reason(self) -> str | None:
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=1.0)
        code = self._proc.returncode
        if code is None:
            return None
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"it ended on {signal.Signals(-code).name}"
        return f"it exited with status {code}"

    def kill(self) -> None:
        """End the process now (its streams are opened again in the next one)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5.0)
            if self._proc.returncode is not None and self._proc.returncode != 0:
                self.pool.lost += 1
                logger.warning(
                    "decoder %d: process %d ended (%s)",
                    self.index,
                    self._proc.pid,
                    self._exit_reason(),
                )
            self._proc = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the process sees the end of its input and exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class DecoderPool:
    """The decoder processes, and streams opened in them (see the module doc).

    Args:
        workers: Decoder processes; 0 decodes in the calling process instead (no isolation).
        call_timeout: Longest one call may take before its process is killed, in seconds.
    """

    def __init__(self, workers: int, *, call_timeout: float = CALL_TIMEOUT_S) -> None:
        if workers < 0:
            raise ValueError(f"workers must be 0 or more, got {workers}")
        self.call_timeout = call_timeout
        self._workers = [_Worker(self, i) for i in range(workers)]
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        #: Processes started, and processes that ended other than by being closed.
        self.started = 0
        self.lost = 0

    @property
    def isolated(self) -> bool:
        """Whether decoding happens in processes of its own."""
        return bool(self._workers)

    def start(self) -> None:
        """Start every decoder process now and wait until each answers, rather than on first
        use (start-up).

        Raises:
            RuntimeError: a decoder process does not start.
        """
        for worker in self._workers:
            with worker.held():
                try:
                    worker.ensure_running()
                except DecoderLost as exc:
                    raise RuntimeError(
                        f"a decoder process did not start ({exc}); see its error above, or "
                        "set WHISPER_DECODE_WORKERS=0 to decode in the server process"
                    ) from exc

    def open(
        self,
        upload: Upload,
        *,
        max_duration: float,
        sample_rate: int = SAMPLE_RATE,
        channel: Channel = None,
    ) -> AudioStream | DecoderStream:
        """An :class:`~server.audio.decode.AudioStream` of ``upload``, decoded in a decoder process
        (or here, with no processes). ``upload`` must stay open while the stream is used.

        Raises:
            AudioError: as the stream's constructor, or ``decoder_failed``.
            ValueError: ``max_duration``, ``sample_rate`` or ``channel`` is out of range.
        """
        if not self._workers:
            return AudioStream(
                upload, max_duration=max_duration, sample_rate=sample_rate, channel=channel
            )
        if max_duration <= 0 or sample_rate <= 0:
            raise ValueError("max_duration and sample_rate must be positive")
        with self._lock:
            worker = min(self._workers, key=lambda w: w.streams)
            worker.streams += 1
        try:
            return DecoderStream(
                worker,
                next(self._ids),
                upload,
                {"max_duration": max_duration, "sample_rate": sample_rate, "channel": channel},
            )
        except BaseException:
            self._release(worker)
            raise

    def decode(self, upload: Upload, *, max_duration: float) -> DecodedAudio:
        """A whole upload decoded to mono (:func:`~server.audio.decode.decode_audio`, isolated).

        Raises:
            AudioError: as :func:`~server.audio.decode.decode_audio`, or ``decoder_failed``.
        """
        with contextlib.closing(self.open(upload, max_duration=max_duration)) as stream:
            return read_whole(stream)

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            worker.streams -= 1

    def pids(self) -> list[int]:
        """Process ids of the decoder processes running now."""
        return [pid for pid in (w.pid for w in self._workers) if pid is not None]

    def resident_bytes(self) -> int:
        """Resident memory of the decoder processes, in bytes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        return total

    def close(self) -> None:
        """Stop every decoder process (shutdown)."""
        for worker in self._workers:
            with worker.lock:
                worker.close()


class DecoderStream:
    """An :class:`~server.audio.decode.AudioStream` that lives in a decoder process: the same reading
    interface, each read fetched in blocks of at most :data:`BLOCK_BYTES`.

    Raises:
        AudioError: as :class:`~server.audio.decode.AudioStream`, or ``decoder_failed``.
    """

    #: What the container says (updated once the first frame has decoded, as in AudioStream).
    info: AudioInfo

    def __init__(
        self, worker: _Worker, stream_id: int, upload: Upload, args: dict[str, Any]
    ) -> None:
        self.sample_rate: int = args["sample_rate"]
        self.max_duration: float = args["max_duration"]
        self.channel: Channel = args["channel"]
        self._worker = worker
        self._id = stream_id
        self._upload = upload
        self._args = args
        self._generation = -1  # the worker process it is open in
        self._delivered = 0  # samples handed out
        self._width: int | None = None if self.channel == ALL_CHANNELS else 1
        self._finished = False
        self._duration: float | None = None
        self._decoded = 0.0
        self._closed = False
        with worker.held():
            self._open_locked()

    # ---- the AudioStream interface ---------------------------------------------------------

    @property
    def duration(self) -> float | None:
        """Seconds of audio: exact once the stream has ended, else what the header declares."""
        return self._duration

    @property
    def decoded_seconds(self) -> float:
        return self._decoded

    @property
    def finished(self) -> bool:
        return self._finished

    def read(self, max_samples: int) -> np.ndarray:
        """As :meth:`server.audio.decode.AudioStream.read`."""
        return to_float(self.read_int16(max_samples))

    def read_int16(self, max_samples: int) -> np.ndarray:
        """As :meth:`server.audio.decode.AudioStream.read_int16`."""
        parts = []
        want = max(0, max_samples)
        while want > 0 and not self._finished:
            chunk = self._read_block(want)  # the process sends at most BLOCK_BYTES a call
            if len(chunk):
                parts.append(chunk)
                want -= len(chunk)
        if not parts:
            return np.empty((0,) if self._width == 1 else (0, self._width or 0), dtype=np.int16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def int16_chunks(self) -> Iterator[np.ndarray]:
        """As :meth:`server.audio.decode.AudioStream.int16_chunks`."""
        while not self._finished:
            chunk = self.read_int16(self.sample_rate)
            if len(chunk):
                yield chunk

    def close(self) -> None:
        """Let the decoder process forget the stream (without waiting for it)."""
        if self._closed:
            return
        self._closed = True
        self._worker.forget(self._id, self._generation)
        self._worker.pool._release(self._worker)

    def __enter__(self) -> DecoderStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls -----------------------------------------------------------------------------

    def _read_block(self, n: int) -> np.ndarray:
        if self._closed:
            raise ValueError("read from a closed stream")
        worker = self._worker
        with worker.held():
            if worker.pid is None or worker.generation != self._generation:
                # The process this stream lived in is gone (another file crashed it): open it
                # again in a new one and skip what was already handed out.
                self._open_locked()
            header, payload = self._call({"op": "read", "id": self._id, "n": n})
        samples = self._samples(header, payload, n)
        self._delivered += len(samples)
        return samples

    def _open_locked(self) -> None:
        upload = self._upload
        fd = upload.fileno()
        header = {"op": "open", "id": self._id, **self._args}
        header, _ = self._call(header, b"" if fd is not None else upload.getvalue(), fd=fd)
        self._generation = self._worker.generation
        if self._delivered:
            self._call({"op": "skip", "id": self._id, "n": self._delivered})

    def _call(
        self, header: dict[str, Any], payload: bytes = b"", *, fd: int | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """One call; the reply's stream state is taken over, and its error raised."""
        try:
            reply, data = self._worker.call(header, payload, fd=fd, max_reply=2 * BLOCK_BYTES)
        except DecoderLost as exc:
            self._finished = True
            raise AudioError(_FAILED.format(why=exc), code="decoder_failed", param="file") from exc
        state = reply.get("state")
        if isinstance(state, dict):
            self._take_state(state)
        error = reply.get("error")
        if isinstance(error, dict):
            message = str(error.get("message", "decoding failed"))[:2000]
            if error.get("kind") == "audio":
                raise AudioError(message, code=str(error.get("code")), param="file")
            raise RuntimeError(f"decoder process: {message}")
        return reply, data

    def _take_state(self, state: dict[str, Any]) -> None:
        info = state.get("info")
        try:
            if isinstance(info, dict):
                self.info = AudioInfo(**info)
            self._finished = bool(state["finished"])
            duration = state["duration"]
            self._duration = None if duration is None else float(duration)
            self._decoded = float(state["decoded_seconds"])
        except (KeyError, TypeError, ValueError) as exc:
            self._worker.kill()
            raise AudioError(
                _FAILED.format(why=f"it sent an invalid reply: {exc}"),
                code="decoder_failed",
                param="file",
            ) from exc

    def _samples(self, header: dict[str, Any], payload: bytes, n: int) -> np.ndarray:
        """The reply's samples, checked against what was asked for.

        Raises:
            AudioError: ``decoder_failed``: they are not what was asked for.
        """
        shape = header.get("shape")
        ndim = 1 if self._width == 1 else 2
        if (
            not isinstance(shape, list)
            or len(shape) != ndim
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or shape[0] > n
            or int(np.prod(shape)) * 2 != len(payload)
            or (ndim == 2 and self._width not in (None, shape[1]))
        ):
            with self._worker.held():
                self._worker.kill()
            raise AudioError(
                _FAILED.format(why=f"it sent samples of shape {shape!r} for {n}"),
                code="decoder_failed",
                param="file",
            )
        samples = np.frombuffer(payload, dtype=np.int16).reshape(shape)
        if ndim == 2 and shape[0]:
            self._width = shape[1]
        return samples
