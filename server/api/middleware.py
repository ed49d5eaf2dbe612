"""The ASGI middlewares around every HTTP request: its id and access log line
(:class:`RequestContextMiddleware`), and the upload's size and pace while it streams in
(:class:`BodyLimitMiddleware`)."""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.connections import PROTOCOL_STATUS
from server.api.errors import error_response
from server.errors import PayloadTooLargeError, ServerError, UploadTimeoutError
from server.memory import format_bytes

logger = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

_INCOMING_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Gives every request an id (``x-request-id``, echoed if the client sent a sane one), logs
    one line per request, and turns anything that escapes the app into a 500 envelope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _INCOMING_ID.match(incoming) else f"req_{uuid.uuid4().hex[:24]}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if status["code"] == 0:
                status["code"] = 500
                response = error_response(
                    ServerError("The server hit an unexpected error; it has been logged."),
                    request_id,
                )
                await response(scope, receive, send)
        finally:
            # A body the protocol layer refused (a malformed chunk, say) ends here as a client
            # disconnect (499), but the client got the protocol's answer: log and count that.
            status["code"] = scope.get("state", {}).get(PROTOCOL_STATUS, status["code"])
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            if metrics is not None:
                metrics.requests.labels(route, str(status["code"])).inc()
                metrics.latency.labels(route).observe(elapsed)
            if scope.get("path") not in ("/health", "/metrics"):
                access_log.info(
                    "%s %s %s %d %.3fs",
                    request_id,
                    scope.get("method"),
                    scope.get("path"),
                    status["code"],
                    elapsed,
                )


class BodyLimitMiddleware:
    """Guards the upload while it streams in.

    A body over the upload limit gets 413: at once when Content-Length says so, otherwise as
    soon as the streamed body passes the limit, without reading the rest. A client that stops
    sending mid-body for ``idle_timeout`` seconds gets 408 and the connection is closed, so a
    stalled upload cannot hold a connection for the whole request timeout. Once the body is
    complete, ``receive`` is passed through untimed (the disconnect watcher waits on it for the
    rest of the request).
    """

    def __init__(self, app: ASGIApp, limit: int, idle_timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.idle_timeout = idle_timeout

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"The request body is larger than the {format_bytes(self.limit)} upload limit "
            "(WHISPER_MAX_UPLOAD_SIZE); send a smaller or more compressed file.",
            param="file",
        )

    def _stalled(self, received: int) -> UploadTimeoutError:
        return UploadTimeoutError(
            f"The upload stalled: nothing arrived for {self.idle_timeout:g} s after "
            f"{format_bytes(received)} of the body (WHISPER_UPLOAD_IDLE_TIMEOUT); send it again.",
            param="file",
            # The rest of the body would only be discarded: free the connection now.
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            request_id = scope.get("state", {}).get("request_id")
            await error_response(self._too_large(), request_id)(scope, receive, send)
            return
        received = 0
        complete = False

        async def guarded() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                with anyio.fail_after(self.idle_timeout):
                    message = await receive()
            except TimeoutError:
                raise self._stalled(received) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)
