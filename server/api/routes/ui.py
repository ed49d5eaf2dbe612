"""GET /ui: the page for people (try it, record, watch the planner); GET / redirects to it.

The page is static and holds no data, so it is served without a key; everything it shows it
fetches from /v1 with the key typed into it. Only the files named here are served: no part of
a request becomes a path.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
_FILES = {name: (resources.files("server") / "ui" / name).read_bytes() for name in _TYPES}

# Same-origin only: the page runs no script or style but its own, and talks to this server.
# blob: is where the recorded or chosen audio plays from.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Small files that change with the server's version: check each time, cheaply.
    "Cache-Control": "no-cache",
}


def _serve(name: str) -> Response:
    return Response(_FILES[name], media_type=_TYPES[name], headers=_HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
async def page() -> Response:
    return _serve("index.html")


@router.get("/ui/app.js")
async def script() -> Response:
    return _serve("app.js")


@router.get("/ui/app.css")
async def style() -> Response:
    return _serve("app.css")
