"""The planner: table-driven decisions, the seed incident, and the budget invariant."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from server.memory import (
    CostModel,
    MemoryAmount,
    MemorySnapshot,
    Plan,
    PlanRequest,
    Policy,
    Shape,
    Step,
    plan_request,
)
from server.memory.model_file import KNOWN_DIMS
from server.memory.planner import (
    CHUNK_LENGTHS,
    choose_host_chunk,
    memory_budget,
    rungs,
    step_down,
)

GiB = 2**30
MiB = 2**20
SnapshotFactory = Callable[..., MemorySnapshot]  # the ``snapshot`` fixture

COST = CostModel(KNOWN_DIMS["large-v3"])
HEADROOM = 512 * MiB
ASKED = Shape("cuda", "float16", batch_size=8, beam_size=5, word_timestamps=True, chunk_length=30)


def need(shape: Shape) -> int:
    return COST.estimate(shape).device_bytes


def plan(
    snapshot: MemorySnapshot,
    shape: Shape = ASKED,
    *,
    policy: Policy | None = None,
    reserved: int = 0,
    waited: float = 0.0,
    audio_seconds: float = 600.0,
    min_batch_size: int = 1,
    cost: CostModel = COST,
    **kwargs: int,
) -> Plan:
    result = plan_request(
        PlanRequest(shape, audio_seconds, min_batch_size),
        snapshot,
        policy or Policy(),
        reserved=reserved,
        cost=cost,
        waited=waited,
        **kwargs,
    )
    if result.action == "run" and (policy is None or policy.mode != "off"):
        assert result.estimate.device_bytes <= result.budget
    return result


def kinds(result: Plan) -> list[str]:
    return [d.kind for d in result.degradations]


def test_as_asked_when_it_fits(snapshot: SnapshotFactory) -> None:
    result = plan(snapshot(free=need(ASKED) + HEADROOM))
    assert (result.action, result.device, result.shape, result.degradations) == (
        "run",
        "cuda",
        ASKED,
        (),
    )
    assert result.reserve_bytes == need(ASKED)
    assert result.host_chunk_seconds == 600.0


B1 = replace(ASKED, batch_size=1)


@pytest.mark.parametrize(
    ("fits", "expected_kinds"),
    [
        (replace(ASKED, batch_size=4), ["batch"]),
        (replace(ASKED, batch_size=1), ["batch"]),
        (replace(B1, chunk_length=20), ["batch", "chunk"]),
        (replace(B1, chunk_length=10), ["batch", "chunk"]),
        (replace(B1, chunk_length=10, beam_size=1), ["batch", "chunk", "greedy"]),
        (
            replace(B1, chunk_length=10, beam_size=1, word_timestamps=False),
            ["batch", "chunk", "greedy", "word_timestamps"],
        ),
    ],
)
def test_each_ladder_step_in_order(
    snapshot: SnapshotFactory, fits: Shape, expected_kinds: list[str]
) -> None:
    result = plan(snapshot(free=need(fits) + HEADROOM))
    assert (result.action, result.shape) == ("run", fits)
    assert kinds(result) == expected_kinds


def test_a_reason_names_the_numbers(snapshot: SnapshotFactory) -> None:
    result = plan(snapshot(free=need(replace(ASKED, batch_size=2)) + HEADROOM))
    (batch,) = result.degradations
    assert batch.reason.startswith("batch 8 -> 2: needs ")
    assert "free after 512 MiB headroom" in batch.reason


def test_nothing_fits_waits_first(snapshot: SnapshotFactory) -> None:
    smallest = replace(B1, chunk_length=10, beam_size=1, word_timestamps=False)
    result = plan(snapshot(free=need(smallest) + HEADROOM - 1))
    assert result.action == "wait"
    assert result.wait_s == 0.5
    assert result.shape == smallest
    assert "needs" in result.reason


@pytest.mark.parametrize(
    ("ladder", "fits", "expected_kinds"),
    [
        # Drop word timestamps before touching the batch.
        (
            ("word_timestamps", "batch", "reject"),
            replace(ASKED, word_timestamps=False, batch_size=2),
            ["word_timestamps", "batch"],
        ),
        # Greedy first: beam 1 at batch 8 may be all it takes.
        (("greedy", "batch", "reject"), replace(ASKED, beam_size=1), ["greedy"]),
        (("chunk", "batch", "reject"), replace(ASKED, chunk_length=20), ["chunk"]),
    ],
)
def test_custom_ladder_order(
    snapshot: SnapshotFactory, ladder: tuple[str, ...], fits: Shape, expected_kinds: list[str]
) -> None:
    policy = Policy(ladder=tuple(Step(s) for s in ladder))
    result = plan(snapshot(free=need(fits) + HEADROOM), policy=policy)
    assert (result.action, result.shape) == ("run", fits)
    assert kinds(result) == expected_kinds


def test_a_ladder_without_a_step_never_takes_it(snapshot: SnapshotFactory) -> None:
    policy = Policy(ladder=(Step.BATCH, Step.REJECT))
    result = plan(snapshot(free=need(replace(B1, beam_size=1)) + HEADROOM), policy=policy)
    assert (result.action, result.shape, kinds(result)) == ("reject", B1, ["batch"])
    assert result.retry_after == 5.0


def test_ladder_steps_may_be_strings() -> None:
    assert Policy(ladder=("greedy", "reject")).ladder == (Step.GREEDY, Step.REJECT)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Policy(ladder=("greedy", "greedy"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Policy(ladder=("shrink",))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("waited", "max_wait", "cpu_fallback", "action", "device", "wait_s"),
    [
        (0.0, 10.0, False, "wait", "cuda", 0.5),
        (9.8, 10.0, False, "wait", "cuda", pytest.approx(0.2)),
        (10.0, 10.0, False, "reject", "cuda", 0.0),
        (10.0, 10.0, True, "run", "cpu", 0.0),
        (0.0, 0.0, True, "run", "cpu", 0.0),
    ],
)
def test_wait_then_move_on(
    snapshot: SnapshotFactory,
    waited: float,
    max_wait: float,
    cpu_fallback: bool,
    action: str,
    device: str,
    wait_s: float,
) -> None:
    policy = Policy(max_wait=max_wait, cpu_fallback=cpu_fallback)
    result = plan(snapshot(free=HEADROOM), waited=waited, policy=policy)
    assert (result.action, result.device, result.wait_s) == (action, device, wait_s)


def test_cpu_fallback_restores_what_was_asked(snapshot: SnapshotFactory) -> None:
    result = plan(snapshot(free=0), waited=10.0, policy=Policy(cpu_fallback=True))
    assert result.action == "run"
    assert result.shape == Shape("cpu", "int8", 1, 5, True, 30)
    assert kinds(result) == ["batch", "cpu"]
    assert result.degradations[1].reason.startswith("cuda -> cpu (int8): ")
    assert result.budget >= result.estimate.device_bytes + result.host_bytes


def test_cpu_fallback_needs_host_room_for_the_model_too(snapshot: SnapshotFactory) -> None:
    policy = Policy(cpu_fallback=True)
    cpu = Shape("cpu", "int8", 1, 5, True, 30)
    estimate = COST.estimate(cpu)
    # Loading the CPU copy peaks at its file and its int8 weights at once.
    load = COST.load_host_bytes("int8", "cpu")
    assert load > COST.dims.weight_bytes + COST.weights_bytes("int8", "cpu")
    host_needs = estimate.device_bytes + estimate.host_bytes(30) + load
    tight = snapshot(free=0, host_free=host_needs + GiB - 1)
    # Loading a CPU copy of the model leaves no room for the shape as asked, only for the
    # GPU's degraded one...
    loading = plan(tight, waited=10.0, policy=policy)
    assert (loading.action, loading.device) == ("run", "cpu")
    assert loading.shape == Shape("cpu", "int8", 1, 1, False, 10)
    assert kinds(loading) == ["batch", "chunk", "greedy", "word_timestamps", "cpu"]
    # ...while a resident CPU model leaves room for what was asked.
    resident = plan(tight, waited=10.0, policy=policy, cpu_load_bytes=0)
    assert (resident.action, resident.shape) == ("run", cpu)
    # With no host room at all, the fallback is refused.
    none = plan(snapshot(free=0, host_free=GiB + 100 * MiB), waited=10.0, policy=policy)
    assert (none.action, none.device) == ("reject", "cuda")


def test_cpu_fallback_off_rejects(snapshot: SnapshotFactory) -> None:
    result = plan(snapshot(free=0), waited=10.0, policy=Policy(cpu_fallback=False))
    assert result.action == "reject" and result.device == "cuda"


@pytest.mark.parametrize(
    ("free_for", "waited", "action", "shape"),
    [
        (ASKED, 0.0, "run", ASKED),
        (B1, 0.0, "wait", ASKED),
        (B1, 10.0, "reject", ASKED),
    ],
)
def test_strict_runs_as_asked_or_waits_or_rejects(
    snapshot: SnapshotFactory, free_for: Shape, waited: float, action: str, shape: Shape
) -> None:
    policy = Policy(mode="strict", cpu_fallback=True)
    result = plan(snapshot(free=need(free_for) + HEADROOM), policy=policy, waited=waited)
    assert (result.action, result.shape, result.degradations) == (action, shape, ())


def test_strict_without_wait_in_the_ladder_rejects_at_once(snapshot: SnapshotFactory) -> None:
    policy = Policy(mode="strict", ladder=(Step.BATCH, Step.REJECT))
    result = plan(snapshot(free=need(B1) + HEADROOM), policy=policy)
    assert result.action == "reject" and "needs" in result.reason


def test_off_runs_as_asked_without_looking(snapshot: SnapshotFactory) -> None:
    result = plan(snapshot(free=0, host_free=0), policy=Policy(mode="off"), audio_seconds=3600)
    assert (result.action, result.shape, result.host_chunk_seconds) == ("run", ASKED, 3600.0)
    assert result.estimate.device_bytes > result.budget == 0


def test_reservations_reduce_the_budget(snapshot: SnapshotFactory) -> None:
    free = need(ASKED) + HEADROOM
    assert plan(snapshot(free=free)).shape == ASKED
    held = plan(snapshot(free=free), reserved=GiB)
    assert held.budget == free - HEADROOM - GiB
    assert held.shape != ASKED and "reserved by running requests" in held.degradations[0].reason


@pytest.mark.parametrize(
    ("limit", "resident", "reserved", "budget"),
    [
        ("50%", 10 * GiB, 0, 2 * GiB),  # 12 GiB of a 24 GiB card, 10 of them weights
        ("11GiB", 10 * GiB, 0, 1 * GiB),
        ("11GiB", 10 * GiB, GiB // 2, GiB // 2),
        ("90%", 0, 0, 20 * GiB - HEADROOM),  # free memory binds before the limit
    ],
)
def test_device_limit(
    snapshot: SnapshotFactory, limit: str, resident: int, reserved: int, budget: int
) -> None:
    policy = Policy(device_limit=MemoryAmount.parse(limit), resident_bytes=resident)
    result = plan(snapshot(total=24 * GiB, free=20 * GiB), policy=policy, reserved=reserved)
    assert result.budget == budget
    if budget < 20 * GiB - HEADROOM - reserved:
        assert f"under the {limit} limit" in result.degradations[0].reason


def test_wait_is_skipped_when_the_device_could_never_fit(snapshot: SnapshotFactory) -> None:
    # A 1 GiB limit with 900 MiB of weights: waiting for others cannot make room.
    policy = Policy(device_limit=MemoryAmount.parse("1GiB"), resident_bytes=900 * MiB)
    result = plan(snapshot(free=20 * GiB), policy=policy)
    assert result.action == "reject"


def test_min_batch_size_and_min_chunk_length(snapshot: SnapshotFactory) -> None:
    policy = Policy(min_chunk_length=20, ladder=(Step.BATCH, Step.CHUNK, Step.REJECT))
    result = plan(snapshot(free=HEADROOM), policy=policy, min_batch_size=2)
    assert (result.shape.batch_size, result.shape.chunk_length) == (2, 20)


@pytest.mark.parametrize(
    ("audio", "available", "expected"),
    [
        (600.0, 10**12, 600.0),  # all of it
        (20.0, 10**9, 20.0),
        (3600.0, 64 * MiB + 100 * 1_000_000, 90.0),  # 100 s affordable -> 90 s pieces
        (3600.0, 64 * MiB + 29 * 1_000_000, None),  # not even 30 s
        (20.0, 64 * MiB, None),
    ],
)
def test_choose_host_chunk(audio: float, available: int, expected: float | None) -> None:
    assert choose_host_chunk(audio, available, lambda s: 64 * MiB + int(1_000_000 * s)) == expected


def test_long_audio_is_cut_to_fit_host_ram(snapshot: SnapshotFactory) -> None:
    result = plan(snapshot(host_free=GiB + 2 * GiB), audio_seconds=10 * 3600)
    per_second = result.estimate.host_bytes_per_audio_second
    assert result.action == "run"
    assert result.host_chunk_seconds % 30 == 0 and 30 <= result.host_chunk_seconds < 10 * 3600
    assert result.host_bytes <= 2 * GiB
    assert result.host_bytes + 30 * per_second > 2 * GiB  # the longest that fits


def test_short_host_ram_does_not_degrade_the_gpu_shape(snapshot: SnapshotFactory) -> None:
    result = plan(snapshot(host_free=GiB), audio_seconds=600.0)
    assert result.action == "wait" and result.degradations == ()
    assert "host RAM" in result.reason


def test_cpu_serving_plans_on_host_ram(snapshot: SnapshotFactory) -> None:
    shape = Shape("cpu", "int8", 1, 5, False, 30)
    estimate = COST.estimate(shape)
    whole = estimate.device_bytes + estimate.host_bytes(600)
    result = plan(snapshot(kind="cpu", host_free=whole + GiB), shape, audio_seconds=600.0)
    assert (result.action, result.device, result.shape) == ("run", "cpu", shape)
    assert result.host_chunk_seconds == 600.0
    # Less room: the audio is held in pieces before anything else changes...
    pieces = plan(snapshot(kind="cpu", host_free=whole + GiB - 1), shape, audio_seconds=600.0)
    assert (pieces.shape, pieces.host_chunk_seconds) == (shape, 570.0)
    # ...and when not even 30 s fit beside the working memory, the shape shrinks.
    least = estimate.device_bytes + estimate.host_bytes(30)
    smaller = plan(snapshot(kind="cpu", host_free=least + GiB - 1), shape, audio_seconds=600.0)
    assert (smaller.action, smaller.device) == ("run", "cpu")
    assert kinds(smaller)[0] == "chunk"
    assert smaller.estimate.device_bytes + smaller.host_bytes <= least - 1


def test_a_batch_whose_requests_hold_the_audio_plans_working_memory_only(
    snapshot: SnapshotFactory,
) -> None:
    """The scheduler's batch: each request reserved its own piece's host memory, so the batch
    must not count the audio again (on the CPU that double count refused batches that fit)."""
    shape = Shape("cpu", "int8", 1, 5, False, 30, batched=True)
    estimate = COST.estimate(shape)
    free = snapshot(kind="cpu", host_free=estimate.device_bytes + GiB)  # 1 GiB is headroom
    counted = plan_request(PlanRequest(shape, 30.0), free, Policy(), reserved=0, cost=COST)
    assert (counted.action, counted.shape) != ("run", shape)  # degraded or refused
    held = plan_request(
        PlanRequest(shape, 30.0, host_held=True), free, Policy(), reserved=0, cost=COST
    )
    assert (held.action, held.shape, held.host_bytes) == ("run", shape, 0)


def test_memory_budget_explains_itself(snapshot: SnapshotFactory) -> None:
    device = snapshot(free=200 * MiB).device
    budget = memory_budget(
        device, headroom=MemoryAmount.parse("512MiB"), limit=None, resident=0, reserved=0
    )
    assert (budget.amount, budget.why) == (0, "200 MiB free, below the 512 MiB headroom")


# ---- the seed incident -----------------------------------------------------------------------

# A 24 GB card shared with other work: 23.57 GiB total, 229.44 MiB free. large-v3 float16,
# batch 1, beam 5, word timestamps, a 16 MB webm (about 1000 s of audio) -> "CUDA out of
# memory. Tried to allocate 1.34 GiB".
SEED_TOTAL = int(23.57 * GiB)
SEED_FREE = int(229.44 * MiB)
SEED_SHAPE = Shape("cuda", "float16", batch_size=1, beam_size=5, word_timestamps=True)


@pytest.mark.parametrize("waited", [0.0, 5.0, 10.0, 60.0])
@pytest.mark.parametrize("cpu_fallback", [False, True])
def test_seed_incident_default_policy(
    snapshot: SnapshotFactory, waited: float, cpu_fallback: bool
) -> None:
    seed = snapshot(total=SEED_TOTAL, free=SEED_FREE)
    result = plan(
        seed,
        SEED_SHAPE,
        policy=Policy(cpu_fallback=cpu_fallback),
        audio_seconds=1000,
        waited=waited,
    )
    # 512 MiB of headroom is more than is free: nothing may run on the GPU.
    assert not (result.action == "run" and result.device == "cuda")
    if result.device == "cuda":
        assert result.budget == 0
    assert result.estimate.device_bytes > SEED_FREE - HEADROOM
    expected = "wait" if waited < 10 else ("run" if cpu_fallback else "reject")
    assert result.action == expected
    if result.action == "run":
        assert result.device == "cpu" and kinds(result) == ["cpu"]


def test_seed_incident_without_headroom(snapshot: SnapshotFactory) -> None:
    seed = snapshot(total=SEED_TOTAL, free=SEED_FREE)
    policy = Policy(device_headroom=MemoryAmount.parse("0"))
    result = plan(seed, SEED_SHAPE, policy=policy, audio_seconds=1000)
    assert result.budget == SEED_FREE
    # Even greedy 10 s windows without word timestamps need more than 229 MiB with large-v3
    # (the 64 MiB workspace, the KV caches, 20% margin), so it waits rather than gambles.
    assert result.action == "wait"
    assert result.estimate.device_bytes > SEED_FREE
    assert kinds(result) == ["chunk", "greedy", "word_timestamps"]
    assert plan(seed, SEED_SHAPE, policy=policy, waited=10, audio_seconds=1000).action == "reject"


def test_seed_incident_with_a_smaller_model_runs_within_the_free_memory(
    snapshot: SnapshotFactory,
) -> None:
    seed = snapshot(total=SEED_TOTAL, free=SEED_FREE)
    policy = Policy(device_headroom=MemoryAmount.parse("0"))
    result = plan(
        seed, SEED_SHAPE, policy=policy, audio_seconds=1000, cost=CostModel(KNOWN_DIMS["base"])
    )
    assert result.action == "run" and result.device == "cuda"
    assert result.estimate.device_bytes <= SEED_FREE


# ---- the invariant, over many random situations ----------------------------------------------


def test_no_run_plan_exceeds_its_budget(snapshot: SnapshotFactory) -> None:
    rng = random.Random(20240229)
    models = [CostModel(dims) for dims in KNOWN_DIMS.values()]
    actions: set[tuple[str, str]] = set()
    for _ in range(1500):
        total = rng.choice([8, 16, 24, 48, 80]) * GiB
        free = int(total * rng.random() ** 2)
        host_total = rng.choice([8, 32, 128]) * GiB
        host_free = int(host_total * rng.random())
        shape = Shape(
            rng.choice(["cuda", "cuda", "cpu"]),
            rng.choice(["float16", "int8_float16", "int8"]),
            rng.choice([1, 2, 4, 8, 16]),
            rng.choice([1, 2, 5]),
            rng.random() < 0.5,
            rng.choice([10, 20, 30]),
        )
        policy = Policy(
            mode=rng.choice(["adapt", "adapt", "strict"]),
            device_headroom=MemoryAmount.parse(rng.choice(["0", "256MiB", "512MiB", "5%"])),
            device_limit=rng.choice([None, MemoryAmount.parse("90%"), MemoryAmount.parse("6GiB")]),
            host_limit=rng.choice([None, MemoryAmount.parse("50%")]),
            cpu_fallback=rng.random() < 0.5,
            resident_bytes=rng.choice([0, GiB, 3 * GiB]),
        )
        reserved = rng.choice([0, 0, 256 * MiB, 2 * GiB])
        snap = snapshot(
            total=total,
            free=free,
            host_total=host_total,
            host_free=host_free,
            kind=shape.device,
        )
        result = plan(
            snap,
            shape,
            policy=policy,
            reserved=reserved,
            waited=rng.choice([0.0, 10.0]),
            audio_seconds=rng.choice([5.0, 600.0, 36000.0]),
            cost=rng.choice(models),
        )
        actions.add((result.action, result.device))
        if result.action != "run":
            continue
        assert result.estimate.device_bytes <= result.budget
        if result.device == "cuda":
            headroom = policy.device_headroom.resolve(total)
            assert result.estimate.device_bytes <= free - reserved - headroom
            assert result.host_bytes <= host_free - policy.host_headroom.resolve(host_total)
        else:
            host_headroom = policy.host_headroom.resolve(host_total)
            used = result.estimate.device_bytes + result.host_bytes
            assert used <= host_free - host_headroom - (reserved if shape.device == "cpu" else 0)
        assert 0 < result.host_chunk_seconds
    # The grid reached every kind of decision.
    assert {("run", "cuda"), ("run", "cpu"), ("wait", "cuda"), ("reject", "cuda")} <= actions


# ---- the step-down after an out-of-memory error: the same rungs as the planner's ladder ----

FULL = ("batch", "chunk", "greedy", "word_timestamps", "wait", "cpu", "reject")


def _walk(shape: Shape, ladder: tuple[str, ...], **kwargs: int) -> list[tuple[int, int, int, bool]]:
    seen = [shape]
    while (nxt := step_down(seen[-1], ladder, **kwargs)) != seen[-1]:
        seen.append(nxt)
    return [(s.batch_size, s.chunk_length, s.beam_size, s.word_timestamps) for s in seen]


@pytest.mark.parametrize(
    ("ladder", "kwargs", "expected"),
    [
        (
            FULL,
            {},
            [
                (4, 30, 5, True),
                (2, 30, 5, True),
                (1, 30, 5, True),
                (1, 20, 5, True),
                (1, 15, 5, True),
                (1, 10, 5, True),
                (1, 10, 1, True),
                (1, 10, 1, False),
            ],
        ),
        (
            ("word_timestamps", "greedy", "batch", "reject"),
            {},
            [
                (4, 30, 5, True),
                (4, 30, 5, False),
                (4, 30, 1, False),
                (2, 30, 1, False),
                (1, 30, 1, False),
            ],
        ),
        (
            FULL,
            {"min_chunk_length": 20},
            [
                (4, 30, 5, True),
                (2, 30, 5, True),
                (1, 30, 5, True),
                (1, 20, 5, True),
                (1, 20, 1, True),
                (1, 20, 1, False),
            ],
        ),
        (("wait", "cpu", "reject"), {}, [(4, 30, 5, True)]),
    ],
)
def test_step_down_table(
    ladder: tuple[str, ...], kwargs: dict[str, int], expected: list[tuple[int, int, int, bool]]
) -> None:
    shape = Shape("cuda", "float16", batch_size=4, beam_size=5, word_timestamps=True)
    assert _walk(shape, ladder, **kwargs) == expected


def test_step_down_takes_the_planners_own_rungs(snapshot: SnapshotFactory) -> None:
    """Every shape the OOM path steps to is one the planner's search visits on the way down."""
    shape = Shape("cuda", "float16", batch_size=8, beam_size=5, word_timestamps=True)
    visited = {shape}
    current = shape
    for step in Step:
        for candidate in rungs(step, current):
            visited.add(candidate)
        current = next(iter(rungs(step, current)[-1:]), current)
    walked = shape
    while (nxt := step_down(walked, FULL)) != walked:
        assert nxt in visited, nxt
        walked = nxt
    assert set(CHUNK_LENGTHS) >= {s.chunk_length for s in visited}
