"""The connection layer under the app: uvicorn's h11 protocol with a header timeout, a bound on
the pace of a request body, a cap on connections, and its own refusals answered in OpenAI's
error envelope and logged.

uvicorn times the idle gap between requests on a keep-alive connection, but not how long a
client takes to send a request's line and headers: one that dribbles a header byte every few
seconds holds its connection indefinitely (slowloris). :class:`BoundedH11Protocol` starts a clock
when a request may begin (the connection opens, or the previous response ends) and stops it when
the headers are complete; data arriving does not restart it.

The body has the same weakness one level up: an idle timeout between its parts is reset by
every byte, so a client that declares a 10 MB upload and sends one byte every few seconds keeps
its connection for good, and a few hundred of them fill the connection cap. The body therefore
gets a deadline that data only extends in proportion to its size (:class:`BodyPace`, Apache's
``MinRate``): a grace period, plus one second per ``upload_min_rate`` bytes received.

``python -m server serve`` and the tests both start uvicorn with :func:`uvicorn_options`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from server.config import Settings
from server.errors import (
    APIError,
    HeadersTooLargeError,
    HeaderTimeoutError,
    MalformedRequestError,
    TooManyConnectionsError,
    UploadTimeoutError,
)
from server.memory import format_bytes

logger = logging.getLogger(__name__)

#: Key in a request's ``scope["state"]``: the status the protocol layer answered itself after the
#: request had reached the app (its body could not be parsed). The app's own answer never reaches
#: the client then, so the access log reports this one.
PROTOCOL_STATUS = "protocol_status"


@dataclass(frozen=True)
class ConnectionLimits:
    """What :class:`BoundedH11Protocol` enforces, from the settings of the same names."""

    header_timeout: float
    max_connections: int  # 0: no cap
    retry_after: float
    upload_min_rate: int = 0  # bytes a second; 0: no bound on a body's pace
    upload_rate_grace: float = 20.0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that bound connections.

    The protocol is always h11, whatever else is installed: uvicorn's ``auto`` would switch to
    httptools when that happens to be present, and the header timeout lives in this subclass.
    Parsing speed does not matter next to a transcription.

    Args:
        settings: ``header_timeout``, ``max_connections`` and ``retry_after`` are read.

    Returns:
        ``{"http": protocol class, "ws": "websockets-sansio"}``.
    """
    limits = ConnectionLimits(
        header_timeout=settings.header_timeout,
        max_connections=settings.max_connections,
        retry_after=settings.retry_after,
        upload_min_rate=settings.upload_min_rate,
        upload_rate_grace=settings.upload_rate_grace,
    )
    protocol = type("WhisperH11Protocol", (BoundedH11Protocol,), {"limits": limits})
    # WebSockets (/v1/realtime) on the `websockets` library's sans-I/O protocol, named rather
    # than `auto`, which would pick its legacy implementation.
    return {"http": protocol, "ws": "websockets-sansio"}


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


class BodyPace:
    """The deadline of one request body: ``grace`` seconds, plus one second for every
    ``min_rate`` bytes received, counting only the time the clock runs (the caller stops it
    while the server, not the client, is the one holding the body back).

    Args:
        grace: Seconds allowed whatever arrives.
        min_rate: Bytes a second that earn their second.
        now: The time (``loop.time()``) the body may start to arrive.
    """

    def __init__(self, grace: float, min_rate: int, now: float) -> None:
        self.grace = grace
        self.min_rate = min_rate
        self.received = 0
        self._counted = 0.0
        self._since: float | None = now

    def add(self, nbytes: int) -> None:
        """Count bytes that arrived."""
        self.received += nbytes

    def run(self, now: float) -> None:
        """Start (or keep) the clock running."""
        if self._since is None:
            self._since = now

    def hold(self, now: float) -> None:
        """Stop the clock: the server is not reading the body now."""
        if self._since is not None:
            self._counted += now - self._since
            self._since = None

    @property
    def running(self) -> bool:
        return self._since is not None

    def elapsed(self, now: float) -> float:
        """Seconds counted against the body so far."""
        return self._counted + (now - self._since if self._since is not None else 0.0)

    def left(self, now: float) -> float:
        """Seconds until the body is too slow (negative: it is)."""
        return self.grace + self.received / self.min_rate - self.elapsed(now)


class _WatchedFlow(FlowControl):
    """uvicorn's flow control, telling the protocol whenever reading is paused or resumed (the
    body's clock stops while the server holds the body back) or the app asks for more."""

    def __init__(self, transport: asyncio.Transport, changed: Callable[[], None]) -> None:
        super().__init__(transport)
        self._changed = changed

    def pause_reading(self) -> None:
        super().pause_reading()
        self._changed()

    def resume_reading(self) -> None:
        # Also called when the app asks for the body, after a 100 Continue went out.
        super().resume_reading()
        self._changed()


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol (one instance per connection) with a header deadline, a body
    pace, a cap on connections and refusals in OpenAI's error envelope. Use a subclass from
    :func:`uvicorn_options`, which sets ``limits``."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._pace: BodyPace | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        if self.limits.max_connections:
            # uvicorn's own cap (limit_concurrency) answers in plain text and serves one
            # connection fewer than it is given; this one wraps the app instead.
            self._app = self.app
            self.app = self._capped

    # ---- the header deadline ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limits.upload_min_rate:
            # Before any request: each request's cycle is handed this object.
            self.flow = _WatchedFlow(transport, self._watch_body)
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        self._stop_body_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._pace is not None:
            self._pace.add(len(data))
        super().data_received(data)

    def handle_events(self) -> None:
        # Runs after every read, and when a response ends and the next request may start.
        super().handle_events()
        self._watch_headers()
        self._watch_body()

    def _watch_headers(self) -> None:
        """Start the clock while the connection waits for a request's headers, stop it once
        they are in (h11 has seen the whole request head)."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._stop_header_clock()
        elif self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.limits.header_timeout, self._headers_too_slow
            )

    def _stop_header_clock(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        pending, _ = self.conn.trailing_data
        if not pending:
            # Nothing of a request yet (a fresh or idle keep-alive connection): close quietly,
            # as uvicorn does when its keep-alive timeout ends.
            logger.debug(
                "%s: no request within %g s; connection closed",
                _peer(self.client),
                self.limits.header_timeout,
            )
            self.transport.close()
            return
        timeout = self.limits.header_timeout
        self._answer_and_close(
            HeaderTimeoutError(
                f"The request line and headers did not arrive within {timeout:g} s "
                "(WHISPER_HEADER_TIMEOUT); send them without pausing."
            ),
            f"{len(pending)} bytes of request head in {timeout:g} s",
        )

    # ---- the body's pace ---------------------------------------------------------------------

    def _watch_body(self) -> None:
        """Run the body's clock from the end of the request head to the end of its body (also
        after the response, if the app answered without reading it all), except while the
        server is the one waiting: reading paused because the app has not taken what came, or
        the client waiting for ``100 Continue`` before it sends."""
        if not self.limits.upload_min_rate:
            return
        if (
            self.conn.their_state is not h11.SEND_BODY
            or self.transport.is_closing()
            # A WebSocket upgrade: its request still looks mid-body to h11 when uvicorn hands
            # the transport to the WebSocket protocol, which owns it from then on.
            or self.transport.get_protocol() is not self
        ):
            self._stop_body_clock()
            return
        now = self.loop.time()
        if self._pace is None:
            self._pace = BodyPace(self.limits.upload_rate_grace, self.limits.upload_min_rate, now)
        if self.flow.read_paused or self.conn.they_are_waiting_for_100_continue:
            self._pace.hold(now)
            self._cancel_body_deadline()
        else:
            self._pace.run(now)
            if self._body_deadline is None:
                self._body_deadline = self.loop.call_later(
                    max(0.0, self._pace.left(now)), self._body_check
                )

    def _cancel_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _stop_body_clock(self) -> None:
        self._cancel_body_deadline()
        self._pace = None

    def _body_check(self) -> None:
        """The deadline as last scheduled has come; bytes since then have pushed it on."""
        self._body_deadline = None
        pace = self._pace
        if (
            pace is None
            or not pace.running
            or self.transport.is_closing()
            or self.transport.get_protocol() is not self
        ):
            return
        now = self.loop.time()
        left = pace.left(now)
        if left > 0:
            self._body_deadline = self.loop.call_later(left, self._body_check)
            return
        elapsed = pace.elapsed(now)
        rate, grace = self.limits.upload_min_rate, self.limits.upload_rate_grace
        error = UploadTimeoutError(
            f"The request body is arriving too slowly: {format_bytes(pace.received)} in "
            f"{elapsed:.0f} s; after the first {grace:g} s the server needs at least "
            f"{format_bytes(rate)} a second on average (WHISPER_UPLOAD_MIN_RATE). Send it "
            "without pausing, or over a faster connection.",
            param="file",
            code="upload_too_slow",
        )
        self._answer_in_request(
            error, f"{pace.received} bytes of body in {elapsed:.1f} s (upload_too_slow)"
        )

    # ---- requests h11 refuses -----------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from its ``except h11.RemoteProtocolError`` block; h11's status hint
        # tells a request head too long to buffer (431) from the rest, all malformed requests
        # here (h11's 501 for a transfer coding it lacks included).
        exc = sys.exc_info()[1]
        hint = exc.error_status_hint if isinstance(exc, h11.RemoteProtocolError) else 400
        detail = str(exc) if exc is not None else msg
        error: APIError
        if hint == 431:
            error = HeadersTooLargeError(
                "The request line and headers are too long for the server to buffer; "
                "send fewer or shorter headers."
            )
        else:
            # h11 says what was wrong, then quotes the bytes; the client gets the first part.
            error = MalformedRequestError(
                f"The HTTP request could not be parsed ({detail.split(':')[0]}); "
                "send a well-formed HTTP/1.1 request."
            )
        self._answer_in_request(error, detail[:200])

    def _answer_in_request(self, error: APIError, reason: str) -> None:
        """Answer ``error`` and close, from inside a request the app may be serving."""
        request_id = None
        if self.cycle is not None and not self.cycle.response_started:
            # The request is in the app (this is its body): the app will see a disconnect and
            # settle on 499, but the client gets this answer, under the app's request id.
            state = self.scope.setdefault("state", {})
            state[PROTOCOL_STATUS] = error.status
            request_id = state.get("request_id")
        self._answer_and_close(error, reason, request_id)

    # ---- the connection cap -------------------------------------------------------------------

    async def _capped(self, scope: Any, receive: Any, send: Any) -> None:
        limit = self.limits.max_connections
        # This connection and this request's task are counted already.
        if len(self.connections) <= limit and len(self.tasks) <= limit:
            await self._app(scope, receive, send)
            return
        error = TooManyConnectionsError(
            f"The server is at its limit of {limit} connections (WHISPER_MAX_CONNECTIONS); "
            "retry later.",
            retry_after=self.limits.retry_after,
        )
        request_id, body, headers = _envelope(error)
        logger.warning(
            "%s %s %s %s: %d, over the connection cap (%d connections, %d requests in flight)",
            request_id,
            _peer(self.client),
            scope.get("method"),
            scope.get("path"),
            error.status,
            len(self.connections),
            len(self.tasks),
        )
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # ---- answering from the protocol ----------------------------------------------------------

    def _answer_and_close(
        self, error: APIError, reason: str, request_id: str | None = None
    ) -> None:
        """Send ``error`` in the envelope, unless a response has started already, then close."""
        request_id, body, headers = _envelope(error, request_id)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            response = h11.Response(
                status_code=error.status,
                headers=[*self.server_state.default_headers, *headers],
                reason=STATUS_PHRASES[error.status],
            )
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            sent = str(error.status)
        else:
            sent = "nothing (a response had started)"
        logger.info(
            "%s %s: answered %s and closed the connection: %s",
            request_id,
            _peer(self.client),
            sent,
            reason,
        )
        self.transport.close()


def _envelope(
    error: APIError, request_id: str | None = None
) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    """The request id (a new one unless given), the envelope body and the headers of an answer
    that closes the connection."""
    request_id = request_id or f"req_{uuid.uuid4().hex[:24]}"
    body = json.dumps(error.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"x-request-id", request_id.encode()),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
    ]
    return request_id, body, headers
