"""The FastAPI application: ``create_app(settings)`` builds it, the lifespan starts the engine,
and every error (ours, FastAPI's validation errors, Starlette's 404/405, unexpected crashes)
leaves as OpenAI's error envelope with an ``x-request-id``."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.admission import Admission
from server.api.connections import PROTOCOL_STATUS
from server.api.origins import OriginMiddleware, OriginPolicy
from server.api.routes import audio, health, models, realtime, ui
from server.audio.decoders import DecoderPool
from server.config import Settings
from server.engine.core import Engine
from server.errors import (
    APIError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServerError,
    UploadTimeoutError,
    quote,
    status_error,
)
from server.memory import format_bytes, host_heap
from server.metrics import Metrics
from server.realtime.admission import LiveSessions

logger = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

_INCOMING_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error_response(exc: APIError, request_id: str | None = None) -> JSONResponse:
    headers = dict(exc.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


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


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def install_error_handlers(app: FastAPI) -> None:
    """Route every kind of failure to the OpenAI envelope."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        if exc.status >= 500:
            logger.warning("request %s: %s %s", _request_id(request), exc.status, exc.message)
        return error_response(exc, _request_id(request))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        message = first.get("msg", "Invalid request")
        param = ".".join(loc) or None
        err = InvalidRequestError(f"{message}" + (f" ({param})" if param else ""), param=param)
        return error_response(err, _request_id(request))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"No route {request.method} {quote(request.url.path)}; see /docs for the API."
        elif exc.status_code == 405:
            detail = f"Method {request.method} is not allowed on {quote(request.url.path)}."
        err = status_error(exc.status_code, detail)
        err.headers.update(exc.headers or {})
        return error_response(err, _request_id(request))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _schema_without_422(app: FastAPI) -> None:
    """FastAPI documents 422 for validation errors; this server answers them with 400."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {
                            "description": "Invalid request",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                                }
                            },
                        }
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application. State lives on ``app.state``: ``settings``, ``engine``,
    ``admission`` (the request queue), ``decoders`` (the decoder processes), ``metrics`` and
    ``realtime``."""
    settings = settings or Settings()
    host_heap.configure()  # also done first thing by `python -m server`; harmless twice
    engine = Engine(settings)
    # Requests admitted (running or waiting), per key: HTTP requests and live sessions alike.
    admission = Admission(settings.max_queue, settings.max_requests_per_key, settings.retry_after)
    metrics = Metrics(engine, admission)
    engine.decisions.on_plan = lambda plan: metrics.batch_size.observe(plan.shape.batch_size)
    decoders = DecoderPool(settings.decode_workers)
    # The decoder processes' memory is the server's too, outside any reservation.
    own_footprint = engine.footprint
    engine.footprint = lambda: own_footprint() + decoders.resident_bytes()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(decoders.start)
        try:
            await anyio.to_thread.run_sync(engine.start)
            yield
            await anyio.to_thread.run_sync(engine.close)
        finally:
            await anyio.to_thread.run_sync(decoders.close)

    app = FastAPI(
        title="whisper-server",
        summary="OpenAI-compatible speech-to-text on faster-whisper that plans around GPU memory.",
        version="0.1.0",
        lifespan=lifespan,
    )
    _schema_without_422(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.admission = admission
    app.state.decoders = decoders
    app.state.metrics = metrics
    app.state.realtime = LiveSessions(settings.realtime_max_sessions, metrics)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(audio.router)
    app.include_router(realtime.router)
    if settings.ui:
        app.include_router(ui.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "x-whisper-degraded", "retry-after"],
        )
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_upload_size.resolve(0),
        idle_timeout=settings.upload_idle_timeout,
    )
    # Inside the request context (refusals get an id and are logged), outside everything else.
    app.add_middleware(
        OriginMiddleware,
        policy=OriginPolicy([*settings.allowed_origins, *settings.cors_origins]),
    )
    app.add_middleware(RequestContextMiddleware)
    return app
