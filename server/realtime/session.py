"""Live transcription sessions (OpenAI's Realtime API, ``intent=transcription``): the socket loop.

One session is one WebSocket. Its loop reads client events (:mod:`server.realtime.events`) and
gives each to the handler registered for its type (:attr:`RealtimeSession._handlers`): updates
change the configuration (:mod:`server.realtime.session_config`), resolved to what the decodes
run with (:mod:`server.realtime.decoding`); the buffer events go to the input
(:mod:`server.realtime.input`: appends decoded, items cut by server VAD or commits), whose items
the transcriber decodes through the engine in the background
(:mod:`server.realtime.transcriber`: deltas and ``completed``). Every event sent is a typed
server event (:mod:`server.realtime.server_events`). To handle a new client event: its model in
``events``, a handler here, and an entry in the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server.config import Settings
from server.engine.core import Engine
from server.errors import APIError, ServerError
from server.metrics import Metrics
from server.realtime.decoding import LiveDecoding
from server.realtime.events import (
    BufferAppend,
    BufferClear,
    BufferCommit,
    ClientEvent,
    Dialect,
    EventError,
    SessionUpdate,
    TranscriptionSessionUpdate,
    parse_client_event,
)
from server.realtime.input import InputAudio
from server.realtime.server_events import (
    BufferCleared,
    ErrorEvent,
    ServerEvent,
    new_id,
    session_created,
    session_updated,
)
from server.realtime.session_config import SessionConfig, apply_beta, apply_ga, session_body
from server.realtime.transcriber import Transcriber

logger = logging.getLogger(__name__)

#: WebSocket close codes: policy violation (auth, bad intent) and "try again later" (limits).
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013
#: The codes of appends refused for the server's bounds, not for what they hold: such audio
#: still shows the client is there (other events answered with an error do not).
_AUDIO_REFUSED = {"input_audio_buffer_full", "input_audio_backlog_full", "insufficient_memory"}

#: A client event's handler.
Handler = Callable[[Any], Awaitable[None]]


class RealtimeSession:
    """One live transcription session on an accepted WebSocket.

    Args:
        ws: The accepted WebSocket.
        engine, settings, metrics: The app's.
        dialect: ``ga`` or ``beta``: how ``*.created`` is sent. Each update is answered in the
            dialect it came in.
        model: The ``model`` query parameter, if any.
        api_key: The id of the API key the session was opened with (its decodes are shown to
            that key in GET /v1/memory).
    """

    def __init__(
        self,
        ws: WebSocket,
        *,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        dialect: Dialect,
        model: str | None,
        api_key: str | None = None,
    ) -> None:
        self.ws = ws
        self.api_key = api_key
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.dialect = dialect
        self.id = new_id("sess")
        self.config = SessionConfig(model=model)
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._audio = InputAudio(
            engine, settings, metrics, owner=self.id, api_key=api_key, send=self._send
        )
        self._transcriber = Transcriber(
            engine, settings, metrics, self._audio, session_id=self.id, send=self._send
        )
        #: The session's host RAM; the route holds it open for the session's life.
        self.memory = self._audio.memory
        #: What each client event type is handed to (its model, from ``parse_client_event``).
        self._handlers: dict[type[ClientEvent], Handler] = {
            SessionUpdate: self._on_session_update,
            TranscriptionSessionUpdate: self._on_transcription_session_update,
            BufferAppend: self._on_append,
            BufferCommit: self._on_commit,
            BufferClear: self._on_clear,
        }

    # ---- lifecycle --------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the session until the client leaves, the session expires or stays idle too
        long; everything it holds is released on the way out.

        Raises:
            APIError: the session cannot start (its model cannot be served, or there is not
                the memory to decode its longest item); nothing was sent yet.
        """
        started = time.monotonic()
        decoding = self._resolve(self.config)
        decoding.check_memory(self.engine)
        self._configure(decoding)
        await self._send(session_created(self.dialect, self._session_body(self.dialect)))
        outcome = "closed"
        try:
            async with self._transcriber.running():
                try:
                    outcome = await self._receive_loop(started)
                finally:
                    self._closed = True  # nothing is sent once the loop has ended
        finally:
            self._audio.buffer.clear()
            self.metrics.realtime_sessions_total.labels(outcome).inc()
            logger.info(
                "realtime %s ended (%s): %d items, %.1f s of audio in %.1f s",
                self.id,
                outcome,
                self._audio.items,
                self._audio.seconds,
                time.monotonic() - started,
            )

    async def _receive_loop(self, started: float) -> str:
        """Read client events until the session ends; returns why it ended. Only audio and
        events acted on keep the session from going idle: one answered with an error (not JSON,
        unknown, invalid) does not."""
        settings = self.settings
        deadline = started + settings.realtime_max_session_duration
        active = time.monotonic()
        while True:
            now = time.monotonic()
            left = min(deadline, active + settings.realtime_idle_timeout) - now
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=max(0.0, left))
            except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11
                return await self._time_out(deadline)
            except (WebSocketDisconnect, RuntimeError):
                return "disconnected"
            if message["type"] == "websocket.disconnect":
                return "disconnected"
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                event = parse_client_event(data)
            except EventError as exc:
                await self._send(ErrorEvent.of(exc, exc.event_id))
                continue
            try:
                await self._handle(event)
                active = time.monotonic()
            except APIError as exc:
                event_id = getattr(exc, "event_id", None) or event.event_id
                await self._send(ErrorEvent.of(exc, event_id))
                if exc.code in _AUDIO_REFUSED:
                    active = time.monotonic()  # audio the server could not take now
            except Exception:
                # A fault of ours: say so and close properly rather than drop the socket.
                logger.exception("realtime %s: %s failed", self.id, event.type)
                await self.close_with(
                    ServerError("The server failed on this event; it has been logged."), 1011
                )
                return "error"
            if self._closed:
                return "disconnected"

    async def _time_out(self, deadline: float) -> str:
        """Close the session that has run too long or stayed idle; returns which."""
        settings = self.settings
        if time.monotonic() >= deadline:
            minutes = settings.realtime_max_session_duration / 60
            await self.close_with(
                EventError(
                    f"The session hit its maximum duration of {minutes:g} minutes "
                    "(WHISPER_REALTIME_MAX_SESSION_DURATION); open a new one.",
                    code="session_expired",
                ),
                1000,
            )
            return "expired"
        await self.close_with(
            EventError(
                f"No valid event for {settings.realtime_idle_timeout:g} s "
                "(WHISPER_REALTIME_IDLE_TIMEOUT); the session was closed.",
                code="session_idle_timeout",
            ),
            1000,
        )
        return "idle"

    async def close_with(self, error: APIError, code: int) -> None:
        """Send ``error`` as an ``error`` event, then close the socket with ``code``.

        Args:
            error: Why the session ends.
            code: The WebSocket close code.
        """
        await self._send(ErrorEvent.of(error))
        self._closed = True
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, error.message[:120])

    async def _send(self, event: ServerEvent) -> None:
        if self._closed:
            return
        text = json.dumps(event.wire(), ensure_ascii=False)
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except Exception:  # the client is gone: the receive loop sees it next
                logger.debug("realtime %s: send failed", self.id, exc_info=True)
                self._closed = True

    # ---- configuration ------------------------------------------------------------------------

    def _resolve(self, config: SessionConfig) -> LiveDecoding:
        return LiveDecoding.resolve(
            self.engine, self.settings, config, session_id=self.id, api_key=self.api_key
        )

    def _configure(self, decoding: LiveDecoding) -> None:
        """Make ``decoding``'s configuration the session's: its decodes, and how its audio is
        taken in."""
        self.config = decoding.config
        self._transcriber.decoding = decoding
        self._audio.configure(decoding.config)

    def _session_body(self, dialect: Dialect) -> dict[str, Any]:
        served = self.engine.served.id if self.engine.served is not None else "whisper-1"
        return session_body(self.config, dialect, session_id=self.id, served=served)

    # ---- client events ------------------------------------------------------------------------

    async def _handle(self, event: ClientEvent) -> None:
        """Act on one client event: the handler registered for its type."""
        await self._handlers[type(event)](event)

    async def _on_session_update(self, event: SessionUpdate) -> None:
        await self._update(apply_ga(self.config, event), "ga", event.event_id)

    async def _on_transcription_session_update(self, event: TranscriptionSessionUpdate) -> None:
        await self._update(apply_beta(self.config, event), "beta", event.event_id)

    async def _update(self, config: SessionConfig, dialect: Dialect, event_id: str | None) -> None:
        """Make ``config`` the session's once it resolves, and answer in ``dialect``.

        Raises:
            EventError: the model, language, prompt or keywords it names cannot be used (the
                session goes on as it was).
        """
        try:
            decoding = self._resolve(config)
        except EventError as exc:
            exc.event_id = event_id
            exc.param = "session." + (exc.param or "")
            raise
        except APIError as exc:
            raise EventError(
                exc.message, event_id=event_id, param=exc.param, code=exc.code
            ) from exc
        self._configure(decoding)
        await self._send(session_updated(dialect, self._session_body(dialect)))

    async def _on_append(self, event: BufferAppend) -> None:
        await self._audio.append(event)
        self._transcriber.wake_for_interim()

    async def _on_commit(self, event: BufferCommit) -> None:
        await self._audio.commit(event.event_id)

    async def _on_clear(self, event: BufferClear) -> None:
        self._audio.clear()
        await self._send(BufferCleared())


__all__ = ["CLOSE_POLICY", "CLOSE_TRY_LATER", "RealtimeSession"]
