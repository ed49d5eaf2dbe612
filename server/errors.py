"""The exception hierarchy, and the one place it becomes an OpenAI-style error body.

Every failure the server reports is an :class:`APIError`. Client faults (4xx) and server
faults (5xx) are separate branches so callers can tell them apart; lower-level exceptions
(PyAV, CTranslate2, pydantic) are translated where they are caught and chained with
``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any

#: Most characters of a client's value that an error message quotes back: enough to recognise
#: it, never the whole of a 5 kB field (messages are logged, shown, and sent on).
QUOTE_CHARS = 40


def quote(value: object) -> str:
    """A client's value as an error message quotes it: ``repr`` of its first
    :data:`QUOTE_CHARS` characters, and how long it was when it was longer.

    Args:
        value: What the client sent (text, a number, a list).

    Returns:
        ``'abc'``, or the first characters and the length: ``'abcd'... (5000 characters)``.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return f"{text[:QUOTE_CHARS]!r}... ({len(text)} characters)"


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error envelope.

    Attributes:
        status: HTTP status code.
        message: What went wrong and, where possible, what to do about it.
        type: OpenAI's error ``type`` (``invalid_request_error``, ``server_error``, ...).
        param: The request field at fault, if any.
        code: A short machine-readable code.
        headers: Extra response headers (``Retry-After``, ...).
    """

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's API returns for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# ---- client faults ---------------------------------------------------------------------------


class ClientError(APIError):
    """The request cannot be served as sent (4xx)."""

    status = 400
    type = "invalid_request_error"


class InvalidRequestError(ClientError):
    """A field is missing, malformed or out of range."""

    code = "invalid_request"


class AudioError(InvalidRequestError):
    """The uploaded file is not audio the server can decode."""

    code = "invalid_audio"


class DiarizationUnavailableError(InvalidRequestError):
    """Diarization was asked for, but the speaker encoder is not installed."""

    code = "diarization_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("param", "response_format")
        super().__init__(message, **kwargs)


class AuthenticationError(ClientError):
    """No API key, or a wrong one."""

    status = 401
    code = "invalid_api_key"


class OriginNotAllowedError(ClientError):
    """A browser request from a web page whose origin may not use this server (see
    :mod:`server.api.origins`)."""

    status = 403
    type = "permission_error"
    code = "origin_not_allowed"


class NotFoundError(ClientError):
    """A model or route that does not exist."""

    status = 404
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The ``model`` field names no model this server serves."""

    code = "model_not_found"


class ConflictError(ClientError):
    """The request conflicts with the server's state (unloading a pinned model)."""

    status = 409
    code = "conflict"


class MethodNotAllowedError(ClientError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLargeError(ClientError):
    """The upload is larger than ``WHISPER_MAX_UPLOAD_SIZE``."""

    status = 413
    code = "file_too_large"


class UploadTimeoutError(ClientError):
    """The client stopped sending its upload for longer than ``WHISPER_UPLOAD_IDLE_TIMEOUT``
    (``upload_timeout``), or sends it slower than ``WHISPER_UPLOAD_MIN_RATE``
    (``upload_too_slow``)."""

    status = 408
    code = "upload_timeout"


class HeaderTimeoutError(ClientError):
    """The request line and headers did not arrive within ``WHISPER_HEADER_TIMEOUT``."""

    status = 408
    code = "header_timeout"


class MalformedRequestError(InvalidRequestError):
    """The HTTP request itself could not be parsed (refused before it reached a route)."""

    code = "malformed_request"


class HeadersTooLargeError(ClientError):
    """The request line and headers are longer than the server buffers."""

    status = 431
    code = "headers_too_large"


class RateLimitError(ClientError):
    """The queue is full; retry later (429 with ``Retry-After``)."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))}
        super().__init__(message, headers=headers, **kwargs)
        self.retry_after = retry_after


class RequestCancelledError(ClientError):
    """The client went away before the response was ready (nginx's 499)."""

    status = 499
    code = "client_closed_request"


# ---- server faults ---------------------------------------------------------------------------


class ServerError(APIError):
    """The server failed (5xx)."""

    status = 500
    type = "server_error"
    code = "internal_error"


class ServiceUnavailableError(ServerError):
    """The server cannot take the request now (503, with ``Retry-After`` when it knows)."""

    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        super().__init__(message, headers=headers, **kwargs)
        self.retry_after = retry_after


class ModelNotReadyError(ServiceUnavailableError):
    """The model failed to load or is still loading."""

    code = "model_not_ready"


class InsufficientMemoryError(ServiceUnavailableError):
    """The planner found no way to fit the request in the memory available now."""

    code = "insufficient_memory"


class TooManyConnectionsError(ServiceUnavailableError):
    """More connections are open than ``WHISPER_MAX_CONNECTIONS`` allows."""

    code = "too_many_connections"


class RequestTimeoutError(ServerError):
    status = 504
    code = "timeout"


def status_error(status: int, message: str) -> APIError:
    """An :class:`APIError` for a bare HTTP status raised by the framework (404, 405, ...)."""
    by_status: dict[int, type[APIError]] = {
        400: InvalidRequestError,
        401: AuthenticationError,
        404: NotFoundError,
        405: MethodNotAllowedError,
        413: PayloadTooLargeError,
    }
    cls = by_status.get(status)
    if cls is not None:
        return cls(message)
    err: APIError = ClientError(message) if status < 500 else ServerError(message)
    err.status = status
    return err
