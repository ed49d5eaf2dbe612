"""A live session's admission: its place among the live sessions, a queue slot, its host RAM.

The route holds :func:`admitted` open for the whole session, so that every way out of it
(the client leaving, an error, the server shutting down) gives back all three.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from server.admission import Admission
from server.errors import RateLimitError
from server.metrics import Metrics
from server.realtime.buffers import SessionMemory


class LiveSessions:
    """The count of open sessions and its limit (``WHISPER_REALTIME_MAX_SESSIONS``).

    Args:
        limit: The most sessions open at once (0: the endpoint is off).
        metrics: The app's (``whisper_realtime_sessions_active``).
    """

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.active = 0
        self._lock = threading.Lock()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one session's place for the block.

        Raises:
            RateLimitError: the limit is reached (or the endpoint is off).
        """
        with self._lock:
            if self.active >= self.limit:
                what = (
                    "Live transcription is off on this server (WHISPER_REALTIME_MAX_SESSIONS=0)."
                    if self.limit == 0
                    else f"The server is at its limit of {self.limit} live sessions "
                    "(WHISPER_REALTIME_MAX_SESSIONS); retry later."
                )
                raise RateLimitError(what, retry_after=5.0, code="session_limit_reached")
            self.active += 1
        self.metrics.realtime_sessions.inc()
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1
            self.metrics.realtime_sessions.dec()


@contextmanager
def admitted(
    sessions: LiveSessions, admission: Admission, key: str | None, memory: SessionMemory
) -> Iterator[None]:
    """Everything a session holds while it is open: its place among the live sessions, a slot
    in the request queue (and the key's share of it), and its audio counted against host RAM
    (``memory``, the session's).

    Args:
        sessions: The app's live sessions.
        admission: The app's request queue.
        key: The id of the session's API key.
        memory: The session's host RAM account.

    Raises:
        RateLimitError: too many sessions, or the queue (or the key's share) is full.
    """
    with ExitStack() as stack:
        stack.enter_context(sessions.admit())
        stack.enter_context(admission.admit(key))
        stack.enter_context(memory)
        yield


__all__ = ["LiveSessions", "admitted"]
