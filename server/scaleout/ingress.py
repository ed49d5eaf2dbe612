"""The ingress: takes HTTP on the cluster's Serve proxy and forwards each request, as it came,
to a replica chosen by the memory-aware router.

It runs on a CPU and holds no model. It reads the body (the router needs the upload's size, and
the replica may run on another node), refuses one over WHISPER_MAX_UPLOAD_SIZE up front, and
streams the replica's response back: status and headers first, then the body as the replica
produces it, so ``stream=true`` answers arrive event by event. A replica that dies before it
answers (a node lost, a replica killed) is not the client's problem: the request goes to
another replica, up to ``retries`` more times. Errors raised here use OpenAI's envelope, like
the replicas' own.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.errors import APIError, PayloadTooLargeError, ServiceUnavailableError
from server.memory.sizes import MemoryAmount
from server.scaleout.router import UPLOAD_BYTES_KWARG

logger = logging.getLogger(__name__)

#: Headers that describe one hop of the connection, not the request, and are not forwarded.
#: (``Host`` is: the replica tells the server's own page from other origins by it.)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"}


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=dict(exc.headers))


class WhisperIngress:
    """Forwards HTTP requests to the replica deployment (a Serve deployment class).

    Args:
        replicas: Handle to the :class:`~server.scaleout.replica.WhisperReplica` deployment.
        max_upload_size: Largest body accepted (``512MiB``), as WHISPER_MAX_UPLOAD_SIZE.
        retries: Other replicas tried when the chosen one dies before answering.
    """

    def __init__(
        self, replicas: DeploymentHandle, max_upload_size: str = "512MiB", retries: int = 2
    ) -> None:
        self.replicas = replicas.options(stream=True)
        self.limit = MemoryAmount.parse(max_upload_size).resolve(0)
        self.retries = retries

    async def __call__(self, request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return _error(
                PayloadTooLargeError(
                    "The request body is larger than the upload limit "
                    "(WHISPER_MAX_UPLOAD_SIZE); send a smaller or more compressed file.",
                    param="file",
                )
            )
        body = await request.body()
        if len(body) > self.limit:
            return _error(
                PayloadTooLargeError(
                    "The request body is larger than the upload limit "
                    "(WHISPER_MAX_UPLOAD_SIZE); send a smaller or more compressed file.",
                    param="file",
                )
            )
        headers = [(k, v) for k, v in request.scope["headers"] if k not in _HOP_BY_HOP]
        args = (
            request.method,
            request.url.path,
            request.scope.get("query_string", b""),
            headers,
            body,
        )
        for attempt in range(self.retries + 1):
            stream = self.replicas.handle_request.remote(*args, **{UPLOAD_BYTES_KWARG: len(body)})
            assert isinstance(stream, DeploymentResponseGenerator)  # options(stream=True)
            try:
                start = await stream.__anext__()
            except (RayActorError, StopAsyncIteration) as exc:
                logger.warning(
                    "a replica failed before answering (attempt %d of %d): %s",
                    attempt + 1,
                    self.retries + 1,
                    exc,
                )
                continue
            return StreamingResponse(
                _rest(stream),
                status_code=start["status"],
                headers=_single(start["headers"]),
            )
        return _error(
            ServiceUnavailableError(
                "No replica could take the request: the ones tried stopped before answering. "
                "Retry after the delay in Retry-After.",
                headers={"Retry-After": "5"},
            )
        )


async def _rest(stream: Any) -> AsyncIterator[bytes]:
    async for message in stream:
        yield message["body"]


def _single(headers: list[tuple[str, str]]) -> Any:
    # Starlette takes a mapping; a header the app sent twice (none today) keeps its last value.
    # The app's content-length is exact for the body relayed; the framing is the proxy's. The
    # proxy passed its request id in and adds it to the response itself.
    return {k: v for k, v in headers if k.lower() not in ("transfer-encoding", "x-request-id")}


__all__ = ["WhisperIngress"]
