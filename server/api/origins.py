"""Which web pages may use this server from a browser: the ``Origin`` check.

A browser lets any page it shows send a form POST, or open a WebSocket, to any server, the one
on the person's own machine included, and sends the page's origin in ``Origin``. With no API
keys (the default) nothing else would stop a page on the web from transcribing with, loading
models into, or opening live sessions on a server at ``127.0.0.1``. So a request that can change
state (a WebSocket upgrade, or any method but GET, HEAD and OPTIONS) that carries an ``Origin``
is let through only from the server's own origin (the page at ``/ui``: the origin's host and
port are those the request was sent to, its ``Host``), or from an origin the operator allowed
(``WHISPER_ALLOWED_ORIGINS``, and the ``WHISPER_CORS_ORIGINS``). Requests with no ``Origin``,
as SDKs, curl and servers send them, are not browsers' and pass. Reads (GET) pass: a page can
send them, but the same-origin policy keeps it from reading the answer unless CORS allows it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import OriginNotAllowedError

logger = logging.getLogger(__name__)

#: Methods that only read; every other method, and every WebSocket upgrade, is checked.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _site(scheme: str, netloc: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a URL's network location, the port filled in from ``scheme``; None
    when it cannot be read."""
    try:
        parts = urlsplit(f"//{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host, port if port is not None else _DEFAULT_PORTS.get(scheme)


def parse_origin(value: str) -> tuple[str, tuple[str, int | None]] | None:
    """An ``Origin`` (``scheme://host[:port]``) as ``(scheme, (host, port))``; None for
    ``null`` (sandboxed pages, ``file:``) or anything that is not an origin."""
    try:
        parts = urlsplit(value.strip().lower())
    except ValueError:
        return None
    if (
        not parts.scheme
        or not parts.netloc
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    site = _site(parts.scheme, parts.netloc)
    return (parts.scheme, site) if site is not None else None


class OriginPolicy:
    """The origins whose pages may send requests that change state.

    Args:
        allowed: Origins allowed besides the server's own (``https://app.example.com``);
            ``*`` allows any.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self.any = False
        self._allowed: set[tuple[str, tuple[str, int | None]]] = set()
        for entry in allowed:
            origin = parse_origin(entry)
            if entry.strip() == "*":
                self.any = True
            elif origin is not None:
                self._allowed.add(origin)
            else:  # WHISPER_ALLOWED_ORIGINS is checked at start-up; CORS takes what it takes
                logger.warning("%r is not an origin (scheme://host[:port]); ignored", entry)

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request from a page at ``origin``, sent to ``host`` (its ``Host``), may
        change state. No ``Origin``: not a browser's request, allowed."""
        if origin is None or self.any:
            return True
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if parsed in self._allowed:
            return True
        scheme, site = parsed
        # The server's own page: the same host and port as the request was sent to. The scheme
        # is not compared: behind a TLS proxy the page is https and the server sees http.
        return host is not None and _site(scheme, host) == site


class OriginMiddleware:
    """Refuses browser requests from origins :class:`OriginPolicy` does not allow: an HTTP
    request gets 403 ``origin_not_allowed`` in the error envelope, a WebSocket upgrade the same
    as its handshake's answer (or, on a server without that extension, a plain 403).

    Args:
        app: The application.
        policy: Which origins are allowed.
    """

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" or (kind == "http" and scope["method"] in SAFE_METHODS):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        host = headers.get(b"host")
        if self.policy.allows(
            origin.decode("latin-1") if origin is not None else None,
            host.decode("latin-1") if host is not None else None,
        ):
            await self.app(scope, receive, send)
            return
        shown = origin.decode("latin-1")[:100] if origin is not None else ""
        logger.info("refused %s %s from origin %r", kind, scope.get("path"), shown)
        error = OriginNotAllowedError(
            f"Requests from web pages at {shown!r} are not allowed to {scope.get('path')}; "
            "the server's operator can allow that origin with WHISPER_ALLOWED_ORIGINS."
        )
        if kind == "http":
            # (RequestContextMiddleware, outside this one, adds the x-request-id.)
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        if "websocket.http.response" in (scope.get("extensions") or {}):
            payload = json.dumps(error.body()).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": error.status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": payload})
            return
        await send({"type": "websocket.close", "code": 1008})


__all__ = ["SAFE_METHODS", "OriginMiddleware", "OriginPolicy", "parse_origin"]
