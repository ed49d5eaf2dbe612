"""Every failure leaves as OpenAI's error envelope: our :class:`~server.errors.APIError`,
FastAPI's validation errors (400, not 422) and Starlette's 404/405, each with the request's
``x-request-id``. The exception hierarchy itself is :mod:`server.errors`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import APIError, InvalidRequestError, quote, status_error

logger = logging.getLogger(__name__)


def error_response(exc: APIError, request_id: str | None = None) -> JSONResponse:
    """The envelope of ``exc``, with its status and headers and the request's id.

    Args:
        exc: The failure, as the client should see it.
        request_id: The request's ``x-request-id``, if it has one yet.

    Returns:
        The response to send.
    """
    headers = dict(exc.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


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


def document_400_not_422(app: FastAPI) -> None:
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
