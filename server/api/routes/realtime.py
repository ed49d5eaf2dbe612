"""WebSocket /v1/realtime?intent=transcription: thin, the session is in server.realtime.session.

A refusal (no or wrong key, another intent, too many sessions, no model) is sent as the
Realtime API does: the socket is accepted, one ``error`` event says why, and it is closed. A
browser, which cannot read an HTTP refusal, sees the reason too.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, WebSocket

from server.api.deps import bearer_token, check_api_key
from server.config import Settings
from server.errors import (
    APIError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
    quote,
)
from server.realtime.admission import LiveSessions, admitted
from server.realtime.events import Dialect
from server.realtime.server_events import ErrorEvent
from server.realtime.session import CLOSE_POLICY, CLOSE_TRY_LATER, RealtimeSession

logger = logging.getLogger(__name__)
router = APIRouter(tags=["realtime"])

#: Browsers cannot set headers: they offer the key (and the beta dialect) as subprotocols.
_KEY_PROTOCOL = "openai-insecure-api-key."
_BETA_PROTOCOL = "openai-beta.realtime-v1"


def _offered(ws: WebSocket) -> list[str]:
    header = ws.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in header.split(",") if p.strip()]


def _dialect(ws: WebSocket, offered: list[str]) -> Dialect:
    """Beta when the client says so (``OpenAI-Beta: realtime=v1``, or the browser's
    subprotocol); the current (GA) dialect otherwise."""
    beta = ws.headers.get("openai-beta", "").replace(" ", "").lower()
    return "beta" if "realtime=v1" in beta or _BETA_PROTOCOL in offered else "ga"


async def _refuse(ws: WebSocket, subprotocol: str | None, error: APIError, code: int) -> None:
    await ws.accept(subprotocol=subprotocol)
    await ws.send_json(ErrorEvent.of(error).wire())
    await ws.close(code, error.message[:120])


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket, intent: str | None = None, model: str | None = None) -> None:
    """OpenAI's Realtime API for transcription sessions, in its GA and beta dialects."""
    app = ws.app
    settings: Settings = app.state.settings
    offered = _offered(ws)
    # Echo "realtime" when offered (a browser fails the handshake if none is echoed); never the
    # key's subprotocol.
    subprotocol = "realtime" if "realtime" in offered else None
    token = next((p[len(_KEY_PROTOCOL) :] for p in offered if p.startswith(_KEY_PROTOCOL)), None)
    try:
        key_id = check_api_key(token or bearer_token(ws.headers.get("authorization", "")), settings)
    except APIError as exc:
        logger.info("realtime: refused %s: %s", ws.client, exc.message)
        await _refuse(ws, subprotocol, exc, CLOSE_POLICY)
        return
    if intent is not None and intent != "transcription":
        await _refuse(
            ws,
            subprotocol,
            InvalidRequestError(
                f"This server serves transcription sessions only; connect with "
                f"?intent=transcription, not {quote(intent)}.",
                param="intent",
            ),
            CLOSE_POLICY,
        )
        return
    engine = app.state.engine
    sessions: LiveSessions = app.state.realtime
    session = RealtimeSession(
        ws,
        engine=engine,
        settings=settings,
        metrics=app.state.metrics,
        dialect=_dialect(ws, offered),
        model=model,
        api_key=key_id,
    )
    try:
        with admitted(sessions, app.state.admission, key_id, session.memory):
            await ws.accept(subprotocol=subprotocol)
            logger.info(
                "realtime %s opened by %s (%s dialect)", session.id, ws.client, session.dialect
            )
            try:
                await session.serve()
            except APIError as exc:
                # The session could not start (no model, a model that does not exist).
                code = CLOSE_TRY_LATER if isinstance(exc, ServiceUnavailableError) else CLOSE_POLICY
                await session.close_with(exc, code)
    except RateLimitError as exc:
        logger.info("realtime: refused %s: %s", ws.client, exc.message)
        await _refuse(ws, subprotocol, exc, CLOSE_TRY_LATER)
