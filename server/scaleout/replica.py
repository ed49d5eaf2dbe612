"""The replica deployment: our own app and engine, driven over ASGI, on one device.

Each replica builds the app with :func:`server.app.create_app` from its Settings (the
environment of its worker, plus the overrides the deployment was given), runs the app's
lifespan (the engine picks the device and loads the model), and answers requests the ingress
forwards: the raw method, path, headers and body go through the app's own middleware and
routers, so uploads, errors and streaming behave exactly as on a single server. Responses come
back as a stream: first the status and headers, then the body as the app sends it (SSE events
as they are produced).

Every ``request_routing_stats_period_s`` Serve asks the replica for its routing stats: the
free memory its planner sees and the cost curve of its model (:class:`ReplicaLoad`), which the
router ranks replicas by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from ray import serve

from server.app import create_app
from server.config import Settings
from server.engine.core import Engine
from server.request import Job
from server.scaleout.fit import ReplicaLoad

logger = logging.getLogger(__name__)

#: The response header that names the replica that served the request.
REPLICA_HEADER = "x-whisper-replica"

#: Lengths of audio, in seconds, at which a replica reports what a request needs: one window,
#: a short file, the first batched lengths, and a long file's piece.
NEED_POINTS = (30.0, 60.0, 120.0, 300.0, 900.0)


def replica_load(engine: Engine, queue: int, points: Sequence[float] = NEED_POINTS) -> ReplicaLoad:
    """What this replica reports to the routers: its planner's free budget on the serving
    device and its model's need at a few lengths, at the default options.

    The budget is the planner's own: ``min(free - reserved - headroom, limit - resident -
    reserved)`` on the serving device (host RAM when serving on the CPU, where the audio's
    reservations count too).

    Args:
        engine: The replica's engine.
        queue: Requests admitted by the replica now (its admission queue's depth).
        points: Audio lengths, in seconds, to give the need at.
    """
    device = engine.places[0]  # a replica is given one GPU (num_gpus=1), or the CPU
    with engine.reservations.planning():
        budget = engine.gate.free_budget(device)
    curve: list[tuple[float, int]] = []
    model = engine.pool.find(engine.served, device) if engine.served is not None else None
    if model is not None:
        piece = engine.settings.max_piece_duration
        for seconds in points:
            job = Job.for_estimate(model.source, engine.settings.default_beam_size)
            estimate = model.cost.estimate(
                engine.planner.requested_shape(model, job, duration=seconds)
            )
            need = estimate.device_bytes
            if device == "cpu":  # the piece's audio and features share the budget
                need += estimate.host_bytes(min(seconds, piece))
            curve.append((seconds, need))
    return ReplicaLoad(
        budget_bytes=budget.amount,
        queue=queue,
        need_curve=tuple(curve),
        taken_at=time.time(),
        device=device,
    )


def replica_name() -> str:
    """``app#deployment#id``: the replica's Serve id (its actor is ``SERVE_REPLICA::`` + it)."""
    replica_id = serve.get_replica_context().replica_id
    full = replica_id.to_full_id_str()
    return full.split("::", 1)[1] if "::" in full else full


def _rank() -> int:
    rank = serve.get_replica_context().rank
    value = getattr(rank, "rank", rank)
    return value if isinstance(value, int) else 0


class WhisperReplica:
    """One engine on one device (a Serve deployment class; see :mod:`server.scaleout.deploy`).

    Args:
        settings: Settings overrides for every replica (``WHISPER_*`` names in lower case,
            without the prefix: ``{"model": "large-v3", "device": "cuda"}``); the rest comes
            from the worker's environment.
        by_rank: Further overrides for the replica of each rank (0, 1, ...), read once, with
            the rank the replica starts with: such as one whose GPU is shared with other work
            and gets a lower ``gpu_memory_limit``. Serve numbers the replicas of a new
            application 0, 1, ...; during a rolling update or after a restart it may start a
            replica under another rank and renumber it later, so for nodes that differ for good
            prefer ``WHISPER_*`` variables in each node's environment.
    """

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        settings: Mapping[str, Any] | None = None,
        by_rank: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        overrides = dict(settings or {})
        rank = _rank()
        if by_rank and rank < len(by_rank):
            overrides.update(by_rank[rank])
        self.name = replica_name()
        self.settings = Settings(**overrides)
        self.app = create_app(self.settings)
        self.engine: Engine = self.app.state.engine
        self._lifespan: AbstractAsyncContextManager[Any] = self.app.router.lifespan_context(
            self.app
        )
        await self._lifespan.__aenter__()
        logger.info(
            "replica %s (rank %d) ready on %s: %s",
            self.name,
            rank,
            self.engine.device,
            self.engine.device_reason,
        )

    async def handle_request(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        upload_bytes: int = 0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one HTTP request through the app; yields ``{"status", "headers"}`` first, then
        ``{"body": bytes}`` pieces as the app sends them.

        ``upload_bytes`` is for the router (:data:`~server.scaleout.router.UPLOAD_BYTES_KWARG`).
        """
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query_string,
            "headers": headers,
            "client": None,
            "server": None,
            "state": {},
        }
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            # The app watches for a disconnect while it works: that is the ingress (and so the
            # client) going away, which cancels this generator.
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await messages.put(dict(message))

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await messages.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    out = [
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]
                    ]
                    out.append((REPLICA_HEADER, self.name))
                    yield {"status": message["status"], "headers": out}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield {"body": message["body"]}
                    if not message.get("more_body", False):
                        break
            await task
        finally:
            disconnected.set()
            if not task.done():
                task.cancel()

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's hook: what the routers rank this replica by."""
        return replica_load(self.engine, self.app.state.admission.depth).to_stats()

    def check_health(self) -> None:
        """Serve's hook: a replica whose model failed to load is restarted elsewhere."""
        if not self.engine.ready:
            raise RuntimeError(f"model not ready: {self.engine.load_error}")

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


__all__ = ["NEED_POINTS", "REPLICA_HEADER", "WhisperReplica", "replica_load", "replica_name"]
