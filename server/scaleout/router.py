"""The memory-aware request router: Serve asks it, per request, which replicas to try.

Serve's default router picks two replicas at random and takes the shorter queue, which treats
a three-hour file and a three-second one alike. This one reads the upload's size that the
ingress passes along (``upload_bytes``), each replica's last report of free memory and cost
(:class:`~server.scaleout.fit.ReplicaLoad`), and ranks them with
:func:`~server.scaleout.fit.rank_replicas`.

A report is up to ``request_routing_stats_period_s`` old, so what this router sent to a
replica after the report was taken is subtracted from the budget it reported, until the
request completes or a newer report covers it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from server.scaleout.fit import (
    UPLOAD_BYTES_PER_SECOND,
    Candidate,
    ReplicaLoad,
    need_bytes,
    rank_replicas,
    upload_seconds,
)

#: The keyword argument of the replica's method that carries the upload's size.
UPLOAD_BYTES_KWARG = "upload_bytes"


@dataclass
class _Routed:
    replica_id: ReplicaID
    need: int
    at: float


class MemoryAwareRouter(RequestRouter):
    """Sends each request to the replica whose reported free memory fits it best.

    Configure with ``request_router_kwargs``: ``upload_bytes_per_second`` (the bitrate assumed
    to turn an upload's size into seconds of audio; 16000 by default).
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._bytes_per_second = float(
            kwargs.get("upload_bytes_per_second", UPLOAD_BYTES_PER_SECOND)
        )
        # Requests routed and not completed, by Serve's internal request id.
        self._routed: dict[str, _Routed] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        seconds = upload_seconds(self._upload_bytes(pending_request), self._bytes_per_second)
        by_key = {r.replica_id: r for r in candidate_replicas}
        candidates = [self._candidate(r) for r in candidate_replicas]
        if pending_request is not None:
            # Ranks already name every replica worth trying; without this Serve would retry
            # them at once, in a loop, while all are at their request limit.
            pending_request.routing_context.should_backoff = True
        return [[by_key[key] for key in rank] for rank in rank_replicas(candidates, seconds)]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        load = ReplicaLoad.from_stats(self._stats_of(replica_id))
        seconds = upload_seconds(self._upload_bytes(pending_request), self._bytes_per_second)
        need = need_bytes(load, seconds) if load is not None else 0
        self._routed[pending_request.metadata.internal_request_id] = _Routed(
            replica_id, need, time.time()
        )

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._routed.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self._routed.items() if r.replica_id == replica_id]:
            del self._routed[key]

    # ---- helpers ----------------------------------------------------------------------------

    def _candidate(self, replica: RunningReplica) -> Candidate:
        load = ReplicaLoad.from_stats(replica.routing_stats)
        since = load.taken_at if load is not None else 0.0
        mine = [r for r in self._routed.values() if r.replica_id == replica.replica_id]
        return Candidate(
            key=replica.replica_id,
            load=load,
            # Exact for the requests this router sent; the report's queue is older.
            in_flight=len(mine),
            routed_bytes=sum(r.need for r in mine if r.at > since),
        )

    def _stats_of(self, replica_id: ReplicaID) -> dict[str, Any] | None:
        replica = self.curr_replicas.get(replica_id)
        return replica.routing_stats if replica is not None else None

    @staticmethod
    def _upload_bytes(pending_request: PendingRequest | None) -> int:
        if pending_request is None:
            return 0
        value = pending_request.kwargs.get(UPLOAD_BYTES_KWARG, 0)
        return value if isinstance(value, int) else 0


__all__ = ["UPLOAD_BYTES_KWARG", "MemoryAwareRouter"]
