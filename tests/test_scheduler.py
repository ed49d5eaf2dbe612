"""The batch scheduler with real models and real audio on the CPU.

Every request's text is checked against the same audio decoded on its own (or by faster-whisper's
``BatchedInferencePipeline``), so a window routed to the wrong request, a prompt applied to the
wrong item or a lost window shows up as a wrong text. Worker behaviour (queue limit, cancellation,
failures) is pinned with the ``around_batch`` hook, which the worker enters around each batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faster_whisper import BatchedInferencePipeline, WhisperModel

from server.audio.decode import decode_audio
from server.batching.policy import LiveDecode, SchedulingPolicy, WorkClass, classify
from server.batching.scheduler import (
    BatchFailedError,
    BatchKey,
    QueueFullError,
    Scheduler,
    Ticket,
    WindowOptions,
    balanced,
)
from server.engine.store import install_default_model
from server.errors import RequestCancelledError
from server.memory.oom import is_out_of_memory
from server.whisper.word_timing import fit_segments, speech_spans
from tests.conftest import wer, within

SR = 16000
LONG = "en_ljspeech_LJ001-0001_to_0032_concat.flac"
SHORT = [
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
]
GREEDY = WindowOptions(beam_size=1, temperatures=(0.0,))


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> WhisperModel:
    return WhisperModel(str(tiny_model), device="cpu", compute_type="int8")


@pytest.fixture(scope="module")
def audio(data_dir: Path) -> dict[str, np.ndarray]:
    names = [*SHORT, LONG, "hotwords.mp3", "es_mls_13697_11991_000000.opus"]
    return {
        name: decode_audio((data_dir / name).read_bytes(), max_duration=3600).samples
        for name in names
    }


@pytest.fixture
def scheduler(tiny: WhisperModel) -> Iterator[Callable[..., Scheduler]]:
    """Make schedulers on tiny.en; all are closed after the test."""
    made: list[Scheduler] = []

    def make(**kwargs: Any) -> Scheduler:
        kwargs.setdefault("max_batch", lambda key: 8)
        made.append(Scheduler(tiny, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def text(ticket: Ticket) -> str:
    return "".join(s.text for s in ticket).strip()


def run_concurrently(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Start every job at the same moment, one thread each; return results or exceptions."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def recording_max_batch(size: int) -> tuple[list[BatchKey], Callable[[BatchKey], int]]:
    """A ``max_batch`` that always answers ``size`` and records the keys it was asked about."""
    keys: list[BatchKey] = []

    def max_batch(key: BatchKey) -> int:
        keys.append(key)
        return size

    return keys, max_batch


@pytest.mark.usefixtures("pipeline_hears_louder")
def test_long_file_matches_batched_pipeline(
    tiny: WhisperModel, scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    samples = audio[LONG]
    raw, _ = BatchedInferencePipeline(tiny).transcribe(
        samples, batch_size=8, beam_size=1, word_timestamps=True
    )
    expected = list(raw)
    s = scheduler(max_batch=lambda key: 8)
    ticket = s.submit(samples, WindowOptions(beam_size=1, word_timestamps=True))
    got = list(ticket)

    # The scheduler then fits word edges to the speech (server.whisper.word_timing), window by window.
    speech, previous_end, fitted = speech_spans(samples), None, []
    for segment in expected:
        fitted += fit_segments([segment], speech, previous_end=previous_end)
        previous_end = fitted[-1].words[-1].end if fitted[-1].words else previous_end

    assert ticket.language == "en"
    assert ticket.windows == len(expected) > 5
    assert [(x.id, x.text, x.start, x.end) for x in got] == [
        (x.id, x.text, x.start, x.end) for x in fitted
    ]
    assert [x.words for x in got] == [x.words for x in fitted]
    assert [[w.word for w in x.words] for x in got] == [[w.word for w in x.words] for x in expected]
    assert got[-1].end > 200  # absolute times, VAD gaps restored
    assert s.stats().fallbacks == 0  # so the default schedule changed nothing here


def test_concurrent_requests_each_get_their_own_text(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    long = audio[LONG]
    clips = [audio[name] for name in [*SHORT, "hotwords.mp3"]]
    clips += [long[0 : 40 * SR], long[60 * SR : 90 * SR], long[120 * SR : 135 * SR]]
    assert len(clips) == 8

    alone = scheduler(max_batch=lambda key: 1)
    expected = [text(alone.submit(clip, GREEDY)) for clip in clips]
    assert len(set(expected)) == 8 and all(expected)

    s = scheduler(max_batch=lambda key: 8, max_wait_s=0.5)
    got = run_concurrently([lambda c=clip: text(s.submit(c, GREEDY)) for clip in clips])

    assert got == expected
    stats = s.stats()
    assert stats.mixed_batches >= 1, stats
    assert max(stats.batch_sizes) > 1, stats
    assert stats.active_requests == 0 and stats.queued_windows == 0


def test_per_request_prompts_in_one_batch(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    clip = audio["hotwords.mp3"]
    s = scheduler(max_batch=lambda key: 2, max_wait_s=0.5)
    options = [
        GREEDY,
        WindowOptions(beam_size=1, temperatures=(0.0,), hotwords="ComfyUI"),
        WindowOptions(beam_size=1, temperatures=(0.0,), initial_prompt="ComfyUI"),
    ]
    plain, hot, prompted = run_concurrently([lambda o=o: text(s.submit(clip, o)) for o in options])

    # Case-insensitive: the hotword's casing in the text varies with the CPU's int8 kernels
    # ("comfyUI" on AMD EPYC, "ComfyUI" elsewhere); without it the model hears "comfy eye".
    assert "comfyui" not in plain.lower()
    assert "comfyui" in hot.lower()
    assert "comfyui" in prompted.lower()
    # hotwords and this prompt are the same number of tokens, so they could share a batch
    assert s.stats().mixed_batches >= 1


def test_language_and_task_per_request_on_the_multilingual_model(
    tmp_path_factory: pytest.TempPathFactory, audio: dict[str, np.ndarray], data_dir: Path
) -> None:
    base = WhisperModel(
        str(install_default_model(tmp_path_factory.mktemp("models"))),
        device="cpu",
        compute_type="int8",
    )
    clip = audio["es_mls_13697_11991_000000.opus"]
    pipeline = BatchedInferencePipeline(base)
    expected = {
        task: "".join(
            x.text for x in pipeline.transcribe(clip, language="es", task=task, beam_size=1)[0]
        ).strip()
        for task in ("transcribe", "translate")
    }

    options = [
        WindowOptions(language="es", task="transcribe", beam_size=1, temperatures=(0.0,)),
        WindowOptions(language="es", task="translate", beam_size=1, temperatures=(0.0,)),
        WindowOptions(language=None, task="transcribe", beam_size=1, temperatures=(0.0,)),
    ]
    with Scheduler(base, max_batch=lambda key: 3, max_wait_s=5.0) as s:
        tickets = run_concurrently([lambda o=o: s.submit(clip, o) for o in options])
        spanish, english, detected = (text(t) for t in tickets)
        stats = s.stats()

    assert stats.batch_sizes == {3: 1}, stats  # all three items in one batch
    assert spanish == expected["transcribe"]
    assert english == expected["translate"]
    assert spanish != english
    reference = (data_dir / "es_mls_13697_11991_000000.txt").read_text()
    assert within("Spanish WER vs reference", wer(reference, spanish), at_most=0.5)
    assert tickets[2].language == "es" and tickets[2].language_probability > 0.5
    assert detected == spanish


def test_max_batch_is_asked_before_each_batch_and_respected(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    keys, max_batch = recording_max_batch(2)
    s = scheduler(max_batch=max_batch, max_wait_s=0.2)
    clips = [audio[LONG][: 60 * SR], audio["jfk.flac"], audio["en_leopard_test.wav"]]
    texts = run_concurrently([lambda c=c: text(s.submit(c, GREEDY)) for c in clips])

    assert all(isinstance(t, str) and t for t in texts), texts
    stats = s.stats()
    assert set(stats.batch_sizes) <= {1, 2} and stats.batch_sizes.get(2), stats
    assert len(keys) == stats.batches
    assert set(keys) == {BatchKey(temperature=0.0, beam_size=1, best_of=1)}


def test_balanced_batches_spread_the_ready_windows_over_the_workers() -> None:
    # One worker, or nothing ready: the budget's size as it is.
    assert balanced(4, 10, 1) == 4 and balanced(4, 0, 2) == 4
    # 10 windows, batches of 4, two workers: 3, 4, 2, 1 as they are taken (5 each), not
    # 4, 4, 2 (6 on one worker while the other idles).
    taken, ready = [], 10
    while ready:
        taken.append(balanced(4, ready, 2))
        ready -= taken[-1]
    assert taken == [3, 4, 2, 1]
    assert [balanced(4, n, 2) for n in (1, 2, 3, 4, 8, 9, 16, 17)] == [1, 1, 2, 2, 4, 3, 4, 3]
    assert balanced(8, 6, 3) == 2


def test_two_workers_decode_two_batches_at_once_with_the_same_text(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    lock = threading.Lock()
    running, most, sizes = [0], [0], []

    @contextmanager
    def around(key: BatchKey, size: int) -> Iterator[None]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            sizes.append(size)
        try:
            yield
        finally:
            with lock:
                running[0] -= 1

    alone = text(scheduler(max_batch=lambda key: 4).submit(audio[LONG], GREEDY))
    s = scheduler(max_batch=lambda key: 4, around_batch=around, workers=2)
    ticket = s.submit(audio[LONG], GREEDY)
    assert text(ticket) == alone  # windows finished out of order still come back in order
    assert most[0] == 2  # two batches ran at the same time
    assert sum(sizes) == ticket.windows == 9
    assert max(sizes) == 3  # 9 ready windows over two workers: batches of 3, not 4, 4, 1
    assert s.stats().queued_windows == 0 and s.stats().active_requests == 0
    with pytest.raises(ValueError, match="workers"):
        scheduler(workers=0)


def test_long_upload_does_not_starve_a_short_one(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    s = scheduler(max_batch=lambda key: 2, max_wait_s=0.0)
    long = s.submit(audio[LONG][: 100 * SR], GREEDY)
    short = s.submit(audio["jfk.flac"], GREEDY)
    assert "ask not what your country" in text(short)
    assert long.windows >= 4 and not long.done  # served in turn, not after the long one
    assert text(long)


def test_queue_limit_raises(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    entered, release = threading.Event(), threading.Event()

    @contextmanager
    def hold_first_batch(key: BatchKey, size: int) -> Iterator[None]:
        entered.set()
        release.wait(timeout=60)
        yield

    s = scheduler(max_queued_windows=2, around_batch=hold_first_batch, max_wait_s=0.0)
    try:
        first = s.submit(audio["jfk.flac"], GREEDY)
        assert entered.wait(timeout=30)  # in flight, so no longer queued
        queued = [s.submit(audio[name], GREEDY) for name in SHORT[1:3]]
        with pytest.raises(QueueFullError, match="retry later"):
            s.submit(audio[SHORT[3]], GREEDY)
        assert s.stats().queued_windows == 2
    finally:
        release.set()
    assert all(text(t) for t in [first, *queued])

    assert s.stats().queued_windows == 0
    with pytest.raises(QueueFullError, match="split it into shorter files"):
        s.submit(audio[LONG], GREEDY)  # more windows than the queue can ever hold
    assert s.stats().rejected == 2


def test_cancellation_drops_queued_windows(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    gone = threading.Event()
    calls = 0

    @contextmanager
    def disconnect_during_second_batch(key: BatchKey, size: int) -> Iterator[None]:
        nonlocal calls
        calls += 1
        yield
        if calls == 2:
            gone.set()

    s = scheduler(max_batch=lambda key: 1, around_batch=disconnect_during_second_batch)
    ticket = s.submit(audio[LONG], GREEDY, cancelled=gone)
    received = []
    with pytest.raises(RequestCancelledError):
        for segment in ticket:
            received.append(segment)
    # The worker goes on; this request's batch comes after the drop.
    assert "ask not what your country" in text(s.submit(audio["jfk.flac"], GREEDY))
    stats = s.stats()
    assert ticket.windows > 5
    assert len(received) <= 2
    assert stats.cancelled_windows == ticket.windows - 2, stats
    assert stats.batches == 3, stats


def test_a_failed_batch_reaches_its_requests_and_the_worker_survives(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    calls = 0

    @contextmanager
    def out_of_memory_once(key: BatchKey, size: int) -> Iterator[None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("CUDA failed with error out of memory")
        yield

    s = scheduler(max_batch=lambda key: 2, max_wait_s=1.0, around_batch=out_of_memory_once)
    names = ["jfk.flac", "en_leopard_test.wav"]
    failed = run_concurrently([lambda n=n: text(s.submit(audio[n], GREEDY)) for n in names])

    for error in failed:
        assert isinstance(error, BatchFailedError), failed
        assert isinstance(error.__cause__, RuntimeError)
        assert is_out_of_memory(error)  # the engine's own check recognises it
    assert "ask not what your country" in text(s.submit(audio["jfk.flac"], GREEDY))
    stats = s.stats()
    assert stats.failed_batches == 1 and stats.batch_sizes == {2: 1, 1: 1}, stats


def test_temperature_fallback_reruns_only_the_failing_window(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    keys, max_batch = recording_max_batch(2)
    s = scheduler(max_batch=max_batch, max_wait_s=1.0)
    # A log-probability threshold of 0 fails every decoding, so this request walks its schedule.
    strict = WindowOptions(beam_size=1, temperatures=(0.0, 0.4), log_prob_threshold=0.0)
    clip = audio["jfk.flac"]
    fallen, plain = run_concurrently(
        [lambda: list(s.submit(clip, strict)), lambda: list(s.submit(clip, GREEDY))]
    )

    assert [x.temperature for x in fallen] == [0.4] * len(fallen)
    assert [x.temperature for x in plain] == [0.0] * len(plain)
    assert "".join(x.text for x in fallen).strip()
    stats = s.stats()
    assert stats.fallbacks == 1 and stats.batch_sizes == {2: 1, 1: 1}, stats
    assert keys[-1] == BatchKey(temperature=0.4, beam_size=1, best_of=5)


def test_audio_without_speech_finishes_at_once(
    scheduler: Callable[..., Scheduler],
) -> None:
    s = scheduler()
    ticket = s.submit(np.zeros(5 * SR, dtype=np.float32), GREEDY)
    assert list(ticket) == [] and ticket.done and ticket.windows == 0
    assert s.stats().batches == 0


def test_options_are_validated_at_submit(scheduler: Callable[..., Scheduler]) -> None:
    with pytest.raises(ValueError, match="task"):
        WindowOptions(task="summarise")
    s = scheduler()
    with pytest.raises(ValueError, match="shorten"):
        s.submit(
            np.zeros(SR, dtype=np.float32),
            WindowOptions(initial_prompt=list(range(500)), hotwords="hello " * 300),
        )


# ---- the scheduling policy: classes, their order, the starvation bound ---------------------


@dataclass
class Queued:
    """What the policy reads of a queued request."""

    name: str
    work_class: WorkClass
    waiting_since: float = 0.0
    skipped: int = 0


def names(groups: list[list[Queued]]) -> list[list[str]]:
    return [[q.name for q in group] for group in groups]


def test_classes_go_in_order_and_take_turns_within_one() -> None:
    policy = SchedulingPolicy(starvation_s=5.0, starvation_batches=8)
    queue = [  # round-robin order: the least recently served first
        Queued("long-a", WorkClass.LONG),
        Queued("short-a", WorkClass.SHORT),
        Queued("interim", WorkClass.LIVE_INTERIM),
        Queued("long-b", WorkClass.LONG),
        Queued("short-b", WorkClass.SHORT),
        Queued("final", WorkClass.LIVE_FINAL),
    ]
    assert names(policy.order(queue, now=1.0)) == [
        ["final"],
        ["interim"],
        ["short-a", "short-b"],
        ["long-a", "long-b"],
    ]
    assert [c.label for c in WorkClass] == ["live_final", "live_interim", "short", "long"]


@pytest.mark.parametrize(
    ("waited_s", "skipped", "leads"),
    [
        (4.9, 7, "short"),  # within both bounds: the class order holds
        (5.0, 0, "long"),  # waited the bound's seconds
        (0.1, 8, "long"),  # passed over by the bound's batches
    ],
)
def test_a_request_past_the_starvation_bound_leads_the_next_batch(
    waited_s: float, skipped: int, leads: str
) -> None:
    policy = SchedulingPolicy(starvation_s=5.0, starvation_batches=8)
    now = 100.0
    long = Queued("long", WorkClass.LONG, waiting_since=now - waited_s, skipped=skipped)
    queue = [Queued("final", WorkClass.LIVE_FINAL, waiting_since=now), long]
    queue.insert(1, Queued("short", WorkClass.SHORT, waiting_since=now))
    expected = "final" if leads == "short" else "long"
    lead = policy.lead(queue, now)
    assert lead is not None and lead.name == expected
    # Among overdue requests the one waiting longest goes first.
    older = Queued("older", WorkClass.SHORT, waiting_since=now - 50, skipped=9)
    lead = policy.lead([long, older], now)
    assert lead is not None and lead.name == "older"


@pytest.mark.parametrize(
    ("live", "seconds", "expected"),
    [
        ("final", 5.0, WorkClass.LIVE_FINAL),
        ("interim", 2.0, WorkClass.LIVE_INTERIM),
        (None, 11.0, WorkClass.SHORT),
        (None, 60.0, WorkClass.SHORT),
        (None, 60.5, WorkClass.LONG),
        (None, None, WorkClass.LONG),  # a stream of unknown length
    ],
)
def test_the_request_factory_classifies_live_decodes_and_files(
    live: LiveDecode | None, seconds: float | None, expected: WorkClass
) -> None:
    assert classify(live=live, seconds=seconds) is expected


def test_live_batches_stay_live_and_finals_hold_back_later_classes() -> None:
    policy = SchedulingPolicy()
    live, files = (WorkClass.LIVE_FINAL, WorkClass.LIVE_INTERIM), (WorkClass.SHORT, WorkClass.LONG)
    assert all(policy.joins(a, b) for a in live for b in live)
    assert not any(policy.joins(a, b) for a in live for b in files)
    assert all(policy.joins(a, b) for a in files for b in WorkClass)
    assert [c for c in WorkClass if policy.holds(WorkClass.LIVE_FINAL, c)] == [
        WorkClass.LIVE_INTERIM,
        WorkClass.SHORT,
        WorkClass.LONG,
    ]
    assert not any(
        policy.holds(c, d) for c in WorkClass if c != WorkClass.LIVE_FINAL for d in WorkClass
    )


def batch_order(s: Scheduler) -> tuple[list[list[WorkClass]], threading.Event]:
    """Record the classes of each batch ``s`` decodes; its worker stops in its first batch
    until the returned event is set (so that everything submitted meanwhile is queued)."""
    order: list[list[WorkClass]] = []
    release = threading.Event()
    run = s._decoder.run

    def recording(key: BatchKey, windows: list[Any], pause: Any = None) -> Any:
        order.append([w.request.work_class for w in windows])
        if len(order) == 1:
            release.wait(60)
        return run(key, windows, pause)

    s._decoder.run = recording  # type: ignore[method-assign]
    return order, release


def as_class(work_class: WorkClass) -> WindowOptions:
    return replace(GREEDY, work_class=work_class)


def test_the_worker_serves_live_then_short_then_long(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    unbounded = SchedulingPolicy(starvation_s=600, starvation_batches=100)
    s = scheduler(max_batch=lambda key: 1, max_wait_s=0.0, policy=unbounded)
    order, release = batch_order(s)
    clip = audio["jfk.flac"]
    tickets = [s.submit(clip, as_class(WorkClass.SHORT))]  # the worker stops in its batch
    tickets += [
        s.submit(audio[LONG][: 70 * SR], as_class(WorkClass.LONG)),
        s.submit(clip, as_class(WorkClass.SHORT)),
        s.submit(clip, as_class(WorkClass.LIVE_INTERIM)),
        s.submit(clip, as_class(WorkClass.LIVE_FINAL)),
    ]
    long_windows = tickets[1].windows
    queued = s.stats().classes
    assert queued["live_final"].queued_windows == 1
    assert queued["long"].queued_windows == long_windows >= 2
    release.set()
    texts = [text(t) for t in tickets]
    assert all("ask not what your country" in t for t in texts[2:]), texts
    assert [b for (b,) in order] == [
        WorkClass.SHORT,
        WorkClass.LIVE_FINAL,
        WorkClass.LIVE_INTERIM,
        WorkClass.SHORT,
        *[WorkClass.LONG] * long_windows,
    ]
    waited = s.stats().classes
    assert waited["long"].waited == long_windows and waited["long"].max_wait_seconds > 0


@pytest.mark.parametrize(("bound", "long_at"), [(2, 3), (8, 6)])
def test_a_long_file_waits_at_most_the_bound_in_batches(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray], bound: int, long_at: int
) -> None:
    policy = SchedulingPolicy(starvation_s=600, starvation_batches=bound)
    s = scheduler(max_batch=lambda key: 1, max_wait_s=0.0, policy=policy)
    order, release = batch_order(s)
    clip = audio["jfk.flac"]
    tickets = [s.submit(clip, as_class(WorkClass.SHORT))]
    tickets.append(s.submit(audio[LONG][: 40 * SR], as_class(WorkClass.LONG)))
    tickets += [s.submit(clip, as_class(WorkClass.SHORT)) for _ in range(5)]
    release.set()
    for t in tickets:
        text(t)
    classes = [b for (b,) in order]
    # Two short batches pass it by, then it leads; without a tight bound it waits for all five.
    assert classes.index(WorkClass.LONG) == long_at, classes


def test_a_final_live_decode_beside_the_queue_holds_back_a_long_file_for_the_bound(
    scheduler: Callable[..., Scheduler], audio: dict[str, np.ndarray]
) -> None:
    s = scheduler(max_batch=lambda key: 1, policy=SchedulingPolicy(starvation_s=1.5))
    started: list[float] = []
    s._decoder.run = lambda key, windows, pause=None, run=s._decoder.run: (  # type: ignore[method-assign]
        started.append(time.monotonic()) or run(key, windows, pause)
    )
    for running, held in [(WorkClass.LIVE_INTERIM, False), (WorkClass.LIVE_FINAL, True)]:
        with s._lock:
            # As Scheduler.decode counts a decode in its caller's thread.
            s._queue.inline[running] += 1
        began = time.monotonic()
        ticket = s.submit(audio["jfk.flac"], as_class(WorkClass.LONG))
        assert "ask not what your country" in text(ticket)
        with s._lock:
            s._queue.inline[running] -= 1
        waited = started[-1] - began
        assert (waited >= 1.4) if held else (waited < 1.4), (running, waited)
    assert s.stats().held_seconds >= 1.4
