"""The FastAPI application: ``create_app(settings)`` builds it and puts its state on
``app.state``, and the lifespan starts and stops the engine and the decoder processes. Every
error leaves as OpenAI's error envelope (:mod:`server.api.errors`), every request with an
``x-request-id`` (:mod:`server.api.middleware`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.admission import Admission
from server.api.errors import document_400_not_422, install_error_handlers
from server.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from server.api.origins import OriginMiddleware, OriginPolicy
from server.api.routes import audio, health, models, realtime, ui
from server.api.service import TranscriptionService
from server.audio.decoders import DecoderPool
from server.config import Settings
from server.engine.core import Engine
from server.memory import host_heap
from server.metrics import Metrics
from server.realtime.admission import LiveSessions


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application. State lives on ``app.state``: ``settings``, ``engine``,
    ``admission`` (the request queue), ``decoders`` (the decoder processes), ``metrics``,
    ``realtime`` (the live sessions) and ``transcriptions`` (the transcription service)."""
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
    document_400_not_422(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.admission = admission
    app.state.decoders = decoders
    app.state.metrics = metrics
    app.state.realtime = LiveSessions(settings.realtime_max_sessions, metrics)
    app.state.transcriptions = TranscriptionService(engine, settings, metrics, decoders, admission)
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
