"""Where work runs when there are several GPUs (``WHISPER_DEVICE_INDEX=0,1``).

Each GPU is a *place* with its own probe, budget, reservations and model copies. A request goes
to a place where the shape it asks for fits (a place without a copy of the model must also fit
its weights), preferring one that holds a copy already, then the one with the most to spare;
if none fits, to the one with the largest budget, where the planner makes it fit. Each piece of
a long file is placed again, so a file moves when another process fills its card.
"""

from __future__ import annotations

import logging

from server.engine.planning import RequestPlanner
from server.engine.pool import ModelPool
from server.memory import ProbeUnavailable
from server.memory.gate import MemoryGate
from server.request import Job

logger = logging.getLogger(__name__)


class Placement:
    """Picks the place for a request or its next piece (see the module doc).

    Args:
        gate: Each place's budget.
        pool: Which places hold a copy of the model.
        planner: The shape a request asks for.
    """

    def __init__(self, gate: MemoryGate, pool: ModelPool, planner: RequestPlanner) -> None:
        self.gate = gate
        self.pool = pool
        self.planner = planner
        #: Where models run: the GPUs of WHISPER_DEVICE_INDEX (``cuda:0``, ...) or ``cpu``.
        self.places: list[str] = ["cpu"]

    def place_for(self, job: Job, seconds: float | None = None) -> str:
        """The place for ``job``, or for its next piece.

        Args:
            job: The request.
            seconds: Audio left to plan for (the next piece); the job's own by default.
        """
        if len(self.places) == 1:
            return self.places[0]
        copies = {
            m.device: m
            for m in self.pool.loaded()
            if m.source.load_target == job.source.load_target
        }
        known = next(iter(copies.values()), None)  # GPU copies share one cost model
        best: tuple[tuple[bool, bool, int], str] | None = None
        for place in self.places:
            try:
                with self.gate.reservations.planning():
                    budget = self.gate.free_budget(place).amount
            except ProbeUnavailable as exc:
                logger.warning("cannot read %s's memory: %s", place, exc.reason)
                continue
            need = 0
            if known is not None:
                shape = self.planner.requested_shape(known, job, seconds)
                need = known.cost.estimate(shape).device_bytes
                need += 0 if place in copies else known.weights_bytes
            # Where it fits; among those, where a copy is loaded already; then the most spare.
            rank = (budget >= need, place in copies, budget - need)
            if best is None or rank > best[0]:
                best = (rank, place)
        return best[1] if best is not None else self.places[0]


__all__ = ["Placement"]
