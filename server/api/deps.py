"""FastAPI dependencies, read from ``app.state``: routers declare what they need as
``Annotated`` aliases and stay thin."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.admission import Admission
from server.api.service import TranscriptionService
from server.audio.decoders import DecoderPool
from server.config import Settings
from server.engine.core import Engine
from server.errors import AuthenticationError
from server.metrics import Metrics


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_decoders(request: Request) -> DecoderPool:
    decoders: DecoderPool = request.app.state.decoders
    return decoders


def get_admission(request: Request) -> Admission:
    admission: Admission = request.app.state.admission
    return admission


def get_transcriptions(request: Request) -> TranscriptionService:
    service: TranscriptionService = request.app.state.transcriptions
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
DecodersDep = Annotated[DecoderPool, Depends(get_decoders)]
TranscriptionsDep = Annotated[TranscriptionService, Depends(get_transcriptions)]


def check_api_key(token: str | None, settings: Settings) -> str | None:
    """Check a client's API key when API keys are configured.

    Every configured key is compared, each in constant time, so the response time does not
    tell which key (or how much of one) matched. Keys are never logged.

    Args:
        token: The key the client sent (the bearer token), or None.

    Returns:
        The key's id (``key-<n>``, its position in WHISPER_API_KEYS, or ``admin-<n>`` in
        WHISPER_ADMIN_API_KEYS: per-key limits and what /v1/memory shows are keyed by it, the
        key itself is never kept), or None when no keys are configured.

    Raises:
        AuthenticationError: no key, or no match.
    """
    keys = settings.key_values()
    if not keys:
        return None
    admins = len(settings.admin_key_values())
    ids = [f"key-{n}" for n in range(len(keys) - admins)] + [f"admin-{n}" for n in range(admins)]
    if token is None or not token.strip():
        raise AuthenticationError(
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = token.strip().encode()
    matched = -1
    for index, key in enumerate(keys):
        if hmac.compare_digest(given, key.encode()):
            matched = index  # the last match: an admin key listed in both lists is an admin
    if matched < 0:
        raise AuthenticationError(
            "Incorrect API key provided.", headers={"WWW-Authenticate": "Bearer"}
        )
    return ids[matched]


def is_admin_key(key_id: str | None) -> bool:
    """Whether a key id from :func:`check_api_key` is one of WHISPER_ADMIN_API_KEYS."""
    return key_id is not None and key_id.startswith("admin-")


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = authorization.partition(" ")
    return token if scheme.lower() == "bearer" else None


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Check ``Authorization: Bearer <key>`` when API keys are configured (see
    :func:`check_api_key`); the key's id goes on ``request.state.api_key_id``.

    Raises:
        AuthenticationError: no key, or no match.
    """
    key_id = check_api_key(bearer_token(request.headers.get("authorization", "")), settings)
    if key_id is not None:
        request.state.api_key_id = key_id


Authorized = Depends(require_api_key)


def require_metrics_key(request: Request, settings: SettingsDep) -> None:
    """``/metrics`` takes the same key as /v1 unless ``WHISPER_METRICS_PUBLIC`` opens it.

    Raises:
        AuthenticationError: keys are configured, metrics are not public, and no key matched.
    """
    if not settings.metrics_public:
        require_api_key(request, settings)


MetricsAuthorized = Depends(require_metrics_key)
