"""The memory-aware request router: Serve asks it, per request, which replicas to try.

Serve's default router picks two replicas at random and takes the shorter queue, which treats
a three-hour file and a three-second one alike. This one reads the upload's size that the
ingress passes along (``upload_bytes``), each replica's last report of free memory and cost
(:class:`~server.scaleout.fit.ReplicaLoad`), and ranks them with
:func:`~server.scaleout.fit.rank_replicas`.

A report is up to ``request_routing_stats_period_s`` old, so what this router sent to a
replica after the report was taken is subtracted from the budget it reported, until the
request completes or a newer report covers it.

A request counts against a replica from the moment this router ranks that replica first for
it, not from Serve's ``on_request_routed``: Serve calls that only after the replica has
answered whether it accepts (a round trip), and meanwhile routes other requests, in other
tasks, that would not see the pick. Counting late sent 7 of 8 equal requests to the same idle
replica. The pick is provisional (Serve may take a later rank when the first is full) until
``on_request_routed`` names the replica, and ends with ``on_request_completed``, or when the
request is cancelled before Serve sent it anywhere (Serve then calls neither).
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
    # Held while the pick is provisional: a request cancelled while Serve routes it gets no
    # completion callback, only its future cancelled (a retry gives it a new future).
    pending: PendingRequest | None = None

    def abandoned(self) -> bool:
        return self.pending is not None and self.pending.future.cancelled()


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
        self._forget_abandoned()
        if pending_request is not None:
            # This request's own earlier pick (a retry, a backoff round) is not load to avoid.
            self._routed.pop(pending_request.metadata.internal_request_id, None)
        candidates = [self._candidate(r) for r in candidate_replicas]
        ranks = rank_replicas(candidates, seconds)
        if pending_request is not None:
            # Ranks already name every replica worth trying; without this Serve would retry
            # them at once, in a loop, while all are at their request limit.
            pending_request.routing_context.should_backoff = True
            if ranks:
                self._record(pending_request, ranks[0][0], seconds, provisional=True)
        return [[by_key[key] for key in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        seconds = upload_seconds(self._upload_bytes(pending_request), self._bytes_per_second)
        self._record(pending_request, replica_id, seconds, provisional=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._routed.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self._routed.items() if r.replica_id == replica_id]:
            del self._routed[key]

    # ---- helpers ----------------------------------------------------------------------------

    def _record(
        self, pending: PendingRequest, replica_id: ReplicaID, seconds: float, *, provisional: bool
    ) -> None:
        key = pending.metadata.internal_request_id
        earlier = self._routed.get(key)
        if earlier is not None and earlier.replica_id == replica_id:
            # Confirming the provisional pick: it has counted against the report since then.
            at, need = earlier.at, earlier.need
        else:
            load = ReplicaLoad.from_stats(self._stats_of(replica_id))
            at, need = time.time(), need_bytes(load, seconds) if load is not None else 0
        self._routed[key] = _Routed(replica_id, need, at, pending if provisional else None)

    def _forget_abandoned(self) -> None:
        for key in [k for k, r in self._routed.items() if r.abandoned()]:
            del self._routed[key]

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
