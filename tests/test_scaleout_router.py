"""The memory-aware router's in-flight accounting (server/scaleout/router.py), without a cluster.

The router is Ray Serve's real ``RequestRouter`` machinery with our subclass; only the replicas
are in-process objects that answer Serve's queue-length probe after an await, as the actor
call does. The real cluster's version of the spread is in tests/test_ray.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from server.scaleout.fit import ReplicaLoad
from server.scaleout.router import UPLOAD_BYTES_KWARG, MemoryAwareRouter

GiB = 1 << 30
DEPLOYMENT = DeploymentID(name="WhisperReplica", app_name="whisper")


class _Replica(RunningReplica):
    """An idle replica with plenty of memory: what Serve's router reads of a replica."""

    def __init__(self, name: str, max_ongoing_requests: int = 8) -> None:  # no actor behind it
        self._id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self._max = max_ongoing_requests
        self.probes = 0

    @property
    def replica_id(self) -> ReplicaID:
        return self._id

    @property
    def max_ongoing_requests(self) -> int:
        return self._max

    @property
    def routing_stats(self) -> dict[str, Any]:
        report = ReplicaLoad(
            budget_bytes=8 * GiB,
            queue=0,
            need_curve=((30.0, GiB // 4), (900.0, GiB)),
            taken_at=time.time(),
        )
        return report.to_stats()

    @property
    def node_id(self) -> str:
        return "node"

    @property
    def availability_zone(self) -> str | None:
        return None

    @property
    def multiplexed_model_ids(self) -> set[str]:
        return set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        await asyncio.sleep(0.005)  # an actor call: other routing tasks run meanwhile
        return 0


def _router(*replicas: _Replica) -> MemoryAwareRouter:
    router = MemoryAwareRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.REPLICA,
        use_replica_queue_len_cache=True,
    )
    router.initialize_state()
    router.update_replicas(list(replicas))
    return router


def _request(upload_bytes: int = 66_000) -> PendingRequest:
    metadata = RequestMetadata(request_id="r", internal_request_id=uuid.uuid4().hex)
    return PendingRequest(args=[], kwargs={UPLOAD_BYTES_KWARG: upload_bytes}, metadata=metadata)


async def _first(router: MemoryAwareRouter, replicas: list[_Replica], pr: PendingRequest) -> str:
    ranks = await router.choose_replicas(list(replicas), pr)
    return str(ranks[0][0].replica_id.unique_id)


def test_concurrent_equal_requests_spread_over_idle_replicas() -> None:
    """8 at once on 2 idle replicas: 4 each. Serve confirms a pick (``on_request_routed``)
    only after the replica's answer, a round trip during which it routes the others."""

    async def scenario() -> Counter[str]:
        replicas = [_Replica("a"), _Replica("b")]
        router = _router(*replicas)

        async def one() -> str:
            pr = _request()
            # Serve's routing loop: choose_replicas, probe the queue, pick from the ranks.
            replica = await router._choose_replica_for_request(pr)
            router.on_send_request(replica.replica_id)
            await asyncio.sleep(0.01)  # the replica's accept/reject answer
            router.on_request_routed(pr, replica.replica_id, None)
            return str(replica.replica_id.unique_id)

        return Counter(await asyncio.gather(*(one() for _ in range(8))))

    assert asyncio.run(scenario()) == {"a": 4, "b": 4}


def test_a_pick_counts_from_the_ranking_until_completed() -> None:
    async def scenario() -> None:
        replicas = [_Replica("a"), _Replica("b")]
        router = _router(*replicas)
        one, two, three = _request(), _request(), _request()
        # Not yet routed by Serve, the first pick already counts against its replica.
        first = await _first(router, replicas, one)
        second = await _first(router, replicas, two)
        assert first != second
        # Serve took a later rank for `one` (its first was full): the count moves with it.
        router.on_request_routed(one, ReplicaID(second, DEPLOYMENT), None)
        assert await _first(router, replicas, three) == first
        # Completions free the slots: `three` (on `first`) is all that is left.
        router.on_request_completed(ReplicaID(second, DEPLOYMENT), one.metadata.internal_request_id)
        router.on_request_completed(ReplicaID(second, DEPLOYMENT), two.metadata.internal_request_id)
        assert await _first(router, replicas, _request()) == second

    asyncio.run(scenario())


def test_a_request_chosen_again_is_not_counted_twice() -> None:
    """A backoff round or a retry after a rejection ranks the same request again."""

    async def scenario() -> None:
        replicas = [_Replica("a"), _Replica("b")]
        router = _router(*replicas)
        pr = _request()
        first = await _first(router, replicas, pr)
        for _ in range(3):
            assert await _first(router, replicas, pr) == first
        assert await _first(router, replicas, _request()) != first

    asyncio.run(scenario())


def test_a_request_cancelled_before_it_was_sent_stops_counting() -> None:
    """Serve calls no completion hook for a request cancelled while it routes: its future,
    cancelled, is all that tells."""

    async def scenario() -> None:
        replicas = [_Replica("a"), _Replica("b")]
        router = _router(*replicas)
        gone = _request()
        first = await _first(router, replicas, gone)
        gone.future.cancel()
        assert await _first(router, replicas, _request()) == first
        assert len(router._routed) == 1

    asyncio.run(scenario())


def test_a_dead_replica_takes_its_picks_with_it() -> None:
    async def scenario() -> None:
        replicas = [_Replica("a"), _Replica("b")]
        router = _router(*replicas)
        picks = [await _first(router, replicas, _request()) for _ in range(4)]
        assert Counter(picks) == {"a": 2, "b": 2}
        router.on_replica_actor_died(ReplicaID("a", DEPLOYMENT))
        assert Counter(r.replica_id.unique_id for r in router._routed.values()) == {"b": 2}

    asyncio.run(scenario())
