"""Cross-request batching: one worker thread decodes the 30 s windows of many requests at once.

A GPU that serves many clients sits idle when requests run one at a time, and running them in
parallel threads multiplies the memory each one holds. The :class:`Scheduler` sits in front of
one model instead. :meth:`Scheduler.submit` cuts a request's audio into windows exactly as
faster-whisper's ``BatchedInferencePipeline.transcribe`` does (Silero VAD, then speech merged
into windows of at most ``chunk_length`` seconds), computes their features in the caller's
thread and queues them. One worker thread takes up to ``max_batch(key)`` windows from any number
of requests, runs encode + generate (+ align, for windows that asked for word timestamps) as one
batch, and routes each result to its request's :class:`Ticket`, which yields faster-whisper
``Segment`` objects in time order with times in seconds from the start of the submitted audio.

What may differ inside one batch, and what may not:

- Per window (per batch item): language, task, initial prompt and hotwords. They only change the
  prompt, and CTranslate2's ``generate`` takes one prompt per item. A request without a language
  on a multilingual model has it detected on its first window's encoder output, inside the batch
  that decodes that window; its other windows wait for the answer.
- Per batch: what CTranslate2 takes once per call (beam size, sampling temperature, penalties,
  suppressed tokens) and whether words are aligned. These make up the :class:`BatchKey`; only
  windows with equal keys share a batch.

A request may also be decoded outside the queue, in the thread that iterates its ticket
(:meth:`Scheduler.decode`, for a caller with a slot of its own): window by window through the
same steps, a batch of one. On the CPUs measured a window's result does not depend on the batch
it is in, so the text does not depend on the path.

Two passes run after generation when a window asks for them: the word alignment, and the
scoring pass for token log-probabilities (``logprobs``), which forces each window's final text
through the decoder once more and keeps every step's logits.

Trade-offs, and where they differ from ``BatchedInferencePipeline``:

- No conditioning on previous text. Windows of one request are decoded in parallel, so window
  *n* cannot be prompted with the text of window *n-1*; every window gets the request's initial
  prompt only. ``BatchedInferencePipeline`` does the same; bench/README.md measures the cost.
- Temperature fallback works per window (``BatchedInferencePipeline`` uses the first temperature
  only). A window whose text is too repetitive (compression ratio above
  ``compression_ratio_threshold``) or too unsure (average log-probability below
  ``log_prob_threshold``, unless it is silence) goes back to the queue at the next temperature
  and joins a later batch of windows at that temperature. It is encoded again there, which is
  cheaper than keeping encoder outputs alive between batches. With ``temperatures=(0.0,)`` the
  output matches ``BatchedInferencePipeline`` exactly.
- A temperature above 0 samples ``best_of`` candidates, as ``WhisperModel.transcribe`` does;
  ``BatchedInferencePipeline`` would run beam search at that temperature instead.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from server.errors import RequestCancelledError
from server.memory import Shape
from server.whisper.runner import SAMPLE_RATE, TEMPERATURES, WhisperRunner
from server.whisper.word_timing import Span, fit_segments, speech_spans

if TYPE_CHECKING:
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import Segment
    from faster_whisper.vad import VadOptions

logger = logging.getLogger(__name__)

TASKS = ("transcribe", "translate")


# ---- errors --------------------------------------------------------------------------------


class SchedulerError(Exception):
    """Base class of the scheduler's errors."""


class QueueFullError(SchedulerError):
    """Too many windows are waiting; the request was not queued (the engine answers 429).

    Attributes:
        queued: Windows waiting when the request came.
        requested: Windows the request would have added (``None`` when it was refused before
            its audio was cut).
        limit: ``max_queued_windows``.
    """

    def __init__(self, queued: int, requested: int | None, limit: int) -> None:
        self.queued = queued
        self.requested = requested
        self.limit = limit
        if requested is not None and requested > limit:
            message = (
                f"The audio makes {requested} windows, more than the {limit} the batch queue "
                "holds; split it into shorter files."
            )
        else:
            adds = f"adds {requested}" if requested is not None else "would add more"
            message = (
                f"The batch queue is full: {queued} windows are waiting and this request "
                f"{adds}, over the limit of {limit}; retry later."
            )
        super().__init__(message)


class SchedulerClosedError(SchedulerError):
    """The scheduler was closed before the request finished."""


class BatchFailedError(SchedulerError, RuntimeError):
    """A batch holding some of this request's windows raised; the request was stopped.

    The exception the model raised is ``__cause__``, and its type and message are in this one's
    message, so a check for CTranslate2's "out of memory" text on ``str(error)`` still works.
    Segments the ticket already yielded stay valid; the caller may submit the rest again.
    """


# ---- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchKey:
    """The options CTranslate2 takes once per ``generate`` call: windows share a batch only
    when their keys are equal. The memory planner sizes batches by this (``max_batch(key)``).

    Attributes:
        temperature: 0 for beam search; above 0, sampling at that temperature.
        beam_size: Beams per window (1 when sampling).
        best_of: Sampled candidates per window (1 for beam search).
        word_timestamps: Whether the batch is also aligned to get word times.
        prefix_length: Tokens before ``<|startoftranscript|>`` in the prompt (the previous-text
            marker, hotwords and initial prompt; 0 without them). CTranslate2 needs that token
            at the same position in every item of a batch, so prompts of different lengths
            cannot share one; padding or cutting them would change the text.
        chunk_length: Seconds each window is padded to for the encoder (30, or less when the
            memory planner shortened the windows).
        logprobs: Whether the batch's tokens are scored for their log-probabilities.
    """

    temperature: float = 0.0
    beam_size: int = 5
    best_of: int = 1
    patience: float = 1.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] = (-1,)
    word_timestamps: bool = False
    prefix_length: int = 0
    chunk_length: int = 30
    logprobs: bool = False

    @property
    def hypotheses(self) -> int:
        """Sequences decoded per window: what the decoder's memory per window scales with."""
        return self.beam_size if self.temperature == 0 else self.best_of

    def memory_shape(self, device: str, compute_type: str, batch_size: int) -> Shape:
        """The memory planner's shape of a batch of ``batch_size`` windows with this key
        (batched windows are padded to ``chunk_length``)."""
        return Shape(
            device=device,
            compute_type=compute_type,
            batch_size=max(1, batch_size),
            beam_size=self.hypotheses,
            word_timestamps=self.word_timestamps,
            chunk_length=self.chunk_length,
            batched=True,
            logprobs=self.logprobs,
        )

    def generate_options(self) -> dict[str, Any]:
        """CTranslate2 ``generate`` options for this key (prompts and suppressed tokens
        aside). Beam search is exactly ``BatchedInferencePipeline``'s call; above 0 it samples
        ``best_of`` candidates, as ``WhisperModel.transcribe`` does."""
        if self.temperature > 0:
            sampling: dict[str, Any] = {
                "beam_size": 1,
                "num_hypotheses": self.best_of,
                "sampling_topk": 0,
                "sampling_temperature": self.temperature,
            }
        else:
            sampling = {
                "beam_size": self.beam_size,
                "patience": self.patience,
                "sampling_temperature": self.temperature,
            }
        return {
            **sampling,
            "length_penalty": self.length_penalty,
            "suppress_blank": self.suppress_blank,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }


@dataclass(frozen=True)
class WindowOptions:
    """One request's options. Defaults are ``BatchedInferencePipeline.transcribe``'s, except
    ``temperatures``, which is the whole fallback schedule (see the module docstring).

    Attributes:
        language: ISO code; ``None`` detects it on the first window (multilingual models).
        task: ``"transcribe"`` or ``"translate"``.
        initial_prompt: Text, or token ids, that prompt every window of the request.
        hotwords: Words to favour, prompted on every window.
        temperatures: The fallback schedule; a window moves to the next temperature when its
            result fails the thresholds below. ``(0.0,)`` turns fallback off.
        vad_filter: Cut windows at speech found by Silero VAD, as ``BatchedInferencePipeline``
            does. Without it, audio is cut every ``chunk_length`` seconds.
        vad_parameters: Silero VAD options; ``max_speech_duration_s`` is set from
            ``chunk_length`` when a mapping is given.
        chunk_length: The longest window, in seconds (at most 30); windows are padded to it.
        logprobs: Score each window's tokens for their log-probabilities (``include[]``).
    """

    language: str | None = None
    task: str = "transcribe"
    initial_prompt: str | Sequence[int] | None = None
    hotwords: str | None = None
    beam_size: int = 5
    best_of: int = 5
    patience: float = 1.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperatures: tuple[float, ...] = TEMPERATURES
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] = (-1,)
    without_timestamps: bool = True
    word_timestamps: bool = False
    prepend_punctuations: str = "\"'“¿([{-"
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"
    vad_filter: bool = True
    vad_parameters: Mapping[str, Any] | VadOptions | None = None
    chunk_length: int = 30
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if self.beam_size < 1 or self.best_of < 1:
            raise ValueError("beam_size and best_of must be at least 1")
        if not self.temperatures or min(self.temperatures) < 0:
            raise ValueError("temperatures must hold at least one value, none below 0")
        if not 1 <= self.chunk_length <= 30:
            raise ValueError("chunk_length must be between 1 and 30 seconds")

    def batch_key(self, step: int = 0, *, prefix_length: int = 0) -> BatchKey:
        """The key of this request's windows at fallback step ``step``, for a prompt with
        ``prefix_length`` tokens before ``<|startoftranscript|>``."""
        temperature = self.temperatures[step]
        sampling = temperature > 0
        return BatchKey(
            temperature=temperature,
            beam_size=1 if sampling else self.beam_size,
            best_of=self.best_of if sampling else 1,
            patience=1.0 if sampling else self.patience,
            length_penalty=self.length_penalty,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            suppress_blank=self.suppress_blank,
            suppress_tokens=self.suppress_tokens,
            word_timestamps=self.word_timestamps,
            prefix_length=prefix_length,
            chunk_length=self.chunk_length,
            logprobs=self.logprobs,
        )


@dataclass(frozen=True)
class SchedulerStats:
    """Counters for /metrics. Batch sizes count windows, fallback re-runs included.

    Attributes:
        queued_windows: Windows waiting for a batch now.
        active_requests: Requests submitted and not yet finished, failed or cancelled.
        batches: Batches run (failed ones included).
        windows: Windows decoded.
        mixed_batches: Batches that held windows of more than one request.
        batch_sizes: How many batches had each size.
        fallbacks: Windows sent back to the queue at a higher temperature.
        failed_batches: Batches that raised.
        cancelled_windows: Queued windows dropped because their request was cancelled.
        rejected: Submissions refused because the queue was full.
    """

    queued_windows: int
    active_requests: int
    batches: int
    windows: int
    mixed_batches: int
    batch_sizes: Mapping[int, int]
    fallbacks: int
    failed_batches: int
    cancelled_windows: int
    rejected: int

    @property
    def mean_batch_size(self) -> float:
        return self.windows / self.batches if self.batches else 0.0


# ---- requests and their windows ------------------------------------------------------------


@dataclass
class _Attempt:
    """One decoding of a window at one temperature."""

    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float


@dataclass
class _Window:
    request: _Request
    index: int
    features: np.ndarray  # log-Mel features, not yet padded to 30 s
    offset: float  # seconds on the request's speech-only timeline
    duration: float
    queued_at: float
    step: int = 0  # index into the request's temperatures
    key: BatchKey = field(default_factory=BatchKey)
    attempts: list[_Attempt] = field(default_factory=list)


@dataclass
class _Decoded:
    """A finished window: its segments (speech-only timeline) and, with word timestamps,
    its word alignment, applied when the window is released in order."""

    segments: list[dict[str, Any]]
    temperature: float
    segment_size: int
    alignment: list[dict[str, Any]] | None


class _Request:
    def __init__(
        self,
        options: WindowOptions,
        ticket: Ticket,
        clips: list[dict[str, int]],
        initial_tokens: list[int],
    ) -> None:
        self.options = options
        self.ticket = ticket
        self.clips = clips  # speech spans in samples, to map times back to the audio
        self.initial_tokens = initial_tokens
        self.tokenizer: Tokenizer | None = None
        self.prompt: list[int] = []
        self.prefix_length = 0  # prompt tokens before <|startoftranscript|>
        self.pending: list[_Window] = []  # queued, in window order
        self.in_flight = 0
        self.total = 0
        self.decoded: dict[int, _Decoded] = {}
        self.released = 0  # windows handed to the ticket, in order
        self.segment_id = 0
        self.last_speech_timestamp = 0.0
        self.speech: list[Span] = []  # fine-grained speech, to fit word edges to
        self.last_word_end: float | None = None
        self.closed = False
        self.inline = False  # decoded by Scheduler.decode in its caller's thread, never queued

    def eligible(self) -> list[_Window]:
        """Queued windows that may join a batch now. Until the language is known only the
        first window may, since detection runs on its encoder output."""
        if self.tokenizer is not None:
            return self.pending
        return self.pending[:1] if self.pending and self.pending[0].index == 0 else []


# ---- the ticket ----------------------------------------------------------------------------


class Ticket(Iterator["Segment"]):
    """A submitted request: iterate it (blocking) for its segments in time order.

    Times are seconds from the start of the submitted audio; words are set when the request
    asked for word timestamps. Iteration raises :class:`BatchFailedError` (a batch with this
    request's windows failed), :class:`RequestCancelledError` or :class:`SchedulerClosedError`.

    Attributes:
        duration: Seconds of audio submitted.
        windows: Windows the audio was cut into.
        cancelled: Set to cancel the request (the caller's event, or a new one).
    """

    def __init__(
        self,
        lock: threading.Lock,
        cancelled: threading.Event,
        wake: Callable[[], None],
        *,
        duration: float,
        windows: int,
        language: str | None,
    ) -> None:
        self._cond = threading.Condition(lock)
        self._wake = wake
        self._segments: deque[Segment] = deque()
        self._finished = False
        self._error: BaseException | None = None
        self._language = language
        self._language_probability = 1.0 if language is not None else 0.0
        self._drive: Callable[[], None] | None = None
        self._withdrawn = False
        self.cancelled = cancelled
        self.duration = duration
        self.windows = windows

    @property
    def language(self) -> str | None:
        """The given or detected language; ``None`` until the first window is decoded, and
        stays ``None`` when a multilingual model got audio without speech and no language."""
        return self._language

    @property
    def language_probability(self) -> float:
        return self._language_probability

    @property
    def done(self) -> bool:
        """Whether every segment has been produced, or the request stopped."""
        with self._cond:
            return self._finished or self._error is not None

    def cancel(self) -> None:
        """Cancel the request: its queued windows are dropped before the next batch."""
        self.cancelled.set()
        self._wake()

    def withdraw(self) -> None:
        """Drop the request's queued windows before the next batch, as :meth:`cancel` does,
        without setting the ``cancelled`` event (the caller's, which may stand for more than
        this ticket): for a caller that stops reading the ticket before its end."""
        self._withdrawn = True
        self._wake()

    def __iter__(self) -> Ticket:
        return self

    def __next__(self) -> Segment:
        while True:
            with self._cond:
                if self._segments:
                    return self._segments.popleft()
                if self._error is not None:
                    raise self._error
                if self._finished:
                    raise StopIteration
                if self.cancelled.is_set():
                    raise RequestCancelledError("The request was cancelled.")
                if self._drive is None:
                    # The timeout only bounds how late a cancellation set elsewhere is noticed.
                    self._cond.wait(timeout=0.25)
                    continue
            self._drive()  # decoded in this thread (Scheduler.decode), outside the lock

    # Called by the scheduler with the lock held.
    def _push(self, segments: list[Segment]) -> None:
        self._segments.extend(segments)
        self._cond.notify_all()

    def _finish(self) -> None:
        self._finished = True
        self._cond.notify_all()

    def _fail(self, error: BaseException) -> None:
        if not self._finished and self._error is None:
            self._error = error
            self._cond.notify_all()

    def _set_language(self, language: str, probability: float) -> None:
        self._language = language
        self._language_probability = probability


# ---- the scheduler -------------------------------------------------------------------------


class BatchBudget(Protocol):
    """What the scheduler asks before and around each batch (the engine hands it the memory
    gate's :class:`server.memory.batch_budget.BatchBudget`; tests and benches a fixed size).

    Each ``max_batch`` call that returns is followed by exactly one ``batch`` scope: when no
    window is left to take by then (their requests were cancelled, or the scheduler closed),
    one of size 0 with no batch in it, so that what ``max_batch`` reserved always has a scope
    to end in.
    """

    def max_batch(self, key: BatchKey, ready: int) -> int:
        """How many windows the next batch of ``key`` may hold (values below 1 count as 1);
        ``ready`` windows could join it now. To refuse work, raise: the error is delivered, as
        a :class:`BatchFailedError`, to every request with windows of that key. It may block,
        for instance to wait for memory."""
        ...

    def batch(self, key: BatchKey, size: int) -> AbstractContextManager[object]:
        """Held on the worker thread while a batch of ``size`` windows runs (to reserve its
        memory, trace it or inject faults). An exception raised on entering it fails the
        batch like a model error would."""
        ...


class CallableBudget:
    """A :class:`BatchBudget` from two plain callables: ``max_batch(key) -> int`` and, when
    given, ``around_batch(key, size) -> context manager``."""

    def __init__(
        self,
        max_batch: Callable[[BatchKey], int],
        around_batch: Callable[[BatchKey, int], AbstractContextManager[object]] | None = None,
    ) -> None:
        self._max_batch = max_batch
        self._around_batch = around_batch

    def max_batch(self, key: BatchKey, ready: int) -> int:
        return self._max_batch(key)

    def batch(self, key: BatchKey, size: int) -> AbstractContextManager[object]:
        return self._around_batch(key, size) if self._around_batch else nullcontext()


class Scheduler:
    """Batches the windows of concurrent requests through one model with one worker thread.

    Args:
        model: A loaded ``faster_whisper.WhisperModel``, or the :class:`WhisperRunner` that
            wraps it. The scheduler is its only user for the requests it runs; nothing else
            should decode with it meanwhile if memory matters.
        budget: Sizes each batch and is held around it (see :class:`BatchBudget`).
        max_batch, around_batch: Instead of ``budget``, the same as two callables (see
            :class:`CallableBudget`).
        max_wait_s: How long the oldest window waits for others to fill a batch; bounds the
            latency a lone request pays.
        max_queued_windows: :meth:`submit` raises :class:`QueueFullError` when more windows
            than this would be waiting.
    """

    def __init__(
        self,
        model: Any,
        *,
        budget: BatchBudget | None = None,
        max_batch: Callable[[BatchKey], int] | None = None,
        max_wait_s: float = 0.02,
        max_queued_windows: int = 1024,
        around_batch: Callable[[BatchKey, int], AbstractContextManager[object]] | None = None,
    ) -> None:
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if max_queued_windows < 1:
            raise ValueError("max_queued_windows must be at least 1")
        if (budget is None) == (max_batch is None):
            raise ValueError("give the scheduler either a budget or max_batch")
        self._runner = model if isinstance(model, WhisperRunner) else WhisperRunner(model)
        if budget is None:
            assert max_batch is not None
            budget = CallableBudget(max_batch, around_batch)
        self._budget = budget
        self._max_wait = max_wait_s
        self._max_queued = max_queued_windows
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._requests: deque[_Request] = deque()  # round-robin order: least recently served first
        self._queued = 0
        self._closed = False
        self._batches = 0
        self._windows = 0
        self._mixed = 0
        self._sizes: Counter[int] = Counter()
        self._fallbacks = 0
        self._failed = 0
        self._cancelled = 0
        self._rejected = 0
        self._worker = threading.Thread(target=self._run, name="whisper-batch", daemon=True)
        self._worker.start()

    # ---- public ---------------------------------------------------------------------------

    def submit(
        self,
        audio: np.ndarray,
        options: WindowOptions | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> Ticket:
        """Cut ``audio`` into windows and queue them (VAD and features run in this thread).

        Args:
            audio: 16 kHz mono float32 samples.
            options: The request's options; the defaults when ``None``.
            cancelled: Set it when the client goes away; the request's queued windows are
                dropped at the next batch and the ticket raises :class:`RequestCancelledError`.

        Returns:
            The ticket to iterate for segments.

        Raises:
            QueueFullError: more than ``max_queued_windows`` windows would be waiting.
            SchedulerClosedError: :meth:`close` was called.
            ValueError: an unknown language, or a prompt that leaves no room to decode.
        """
        with self._lock:
            self._check_open()
            if self._queued >= self._max_queued:  # refuse before spending time on VAD
                self._rejected += 1
                raise QueueFullError(self._queued, None, self._max_queued)
        request = self._cut(audio, options or WindowOptions(), cancelled)
        with self._lock:
            self._check_open()
            if self._queued + request.total > self._max_queued:
                self._rejected += 1
                raise QueueFullError(self._queued, request.total, self._max_queued)
            if not request.total:
                request.ticket._finish()
                return request.ticket
            self._queued += request.total
            self._requests.append(request)
            self._wake.notify_all()
        return request.ticket

    def decode(
        self,
        audio: np.ndarray,
        options: WindowOptions | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> Ticket:
        """Like :meth:`submit`, but the windows are decoded in the thread that iterates the
        ticket, one at a time, and never queued: for a caller that holds a slot of its own.

        Each window goes through the very steps a batch runs (a batch of one), so the segments
        are those the request would get in any batch: the same input gives the same text
        whichever path it took. Errors from the model are raised as they are.
        """
        request = self._cut(audio, options or WindowOptions(), cancelled)
        request.inline = True
        ticket = request.ticket
        if not request.total:
            with self._lock:
                ticket._finish()
            return ticket

        def drive() -> None:
            with self._lock:
                self._check_open()
                window = request.pending.pop(0) if request.pending else None
                if window is not None:
                    request.in_flight += 1
            if window is None:
                raise RuntimeError("no window left to decode for an unfinished request")
            self._decode(window.key, [window])

        ticket._drive = drive
        return ticket

    def _cut(
        self, audio: np.ndarray, options: WindowOptions, cancelled: threading.Event | None
    ) -> _Request:
        """A request with its windows cut and their features computed, not yet queued."""
        runner = self._runner
        multilingual = runner.multilingual
        language = options.language
        if not multilingual and language not in (None, "en"):
            logger.warning("English-only model; language %r replaced by 'en'", language)
        if not multilingual:
            language = "en"
        # Validates the language and the prompt's length before anything is queued.
        tokenizer = runner.tokenizer(language or "en", options.task)
        initial = runner.prompt_tokens(tokenizer, options.initial_prompt)
        prompt = self._prompt(tokenizer, options, initial)
        if len(prompt) >= runner.max_length:
            raise ValueError(
                f"The prompt and hotwords take {len(prompt)} tokens, leaving none of the "
                f"model's {runner.max_length} to decode; shorten them."
            )

        clips, chunks, metadata = runner.cut(
            np.asarray(audio, dtype=np.float32),
            vad_filter=options.vad_filter,
            vad_parameters=options.vad_parameters,
            chunk_length=options.chunk_length,
        )
        speech = sum(c["end"] - c["start"] for c in clips)
        features = [runner.features(chunk) for chunk in chunks] if speech else []

        event = cancelled if cancelled is not None else threading.Event()
        ticket = Ticket(
            self._lock,
            event,
            self._notify,
            duration=len(audio) / SAMPLE_RATE,
            windows=len(features),
            language=language,
        )
        request = _Request(options, ticket, clips, initial)
        if options.word_timestamps and speech:
            request.speech = speech_spans(np.asarray(audio, dtype=np.float32))
        if language is not None:
            request.tokenizer, request.prompt = tokenizer, prompt
        # The language token comes after <|startoftranscript|>, so its position is known now.
        request.prefix_length = prompt.index(tokenizer.sot)
        now = time.monotonic()
        key = options.batch_key(0, prefix_length=request.prefix_length)
        request.pending = [
            _Window(request, i, f, float(m["offset"]), float(m["duration"]), now, key=key)
            for i, (f, m) in enumerate(zip(features, metadata[: len(features)], strict=True))
        ]
        request.total = len(request.pending)
        return request

    def ready(self, key: BatchKey) -> int:
        """How many queued windows with ``key`` could join a batch now."""
        with self._lock:
            return sum(1 for r in self._requests for w in r.eligible() if w.key == key)

    def stats(self) -> SchedulerStats:
        """A snapshot of the counters."""
        with self._lock:
            return SchedulerStats(
                queued_windows=self._queued,
                active_requests=len(self._requests),
                batches=self._batches,
                windows=self._windows,
                mixed_batches=self._mixed,
                batch_sizes=dict(sorted(self._sizes.items())),
                fallbacks=self._fallbacks,
                failed_batches=self._failed,
                cancelled_windows=self._cancelled,
                rejected=self._rejected,
            )

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after the batch it is running; unfinished requests get
        :class:`SchedulerClosedError`. Idempotent."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._worker.join(timeout)
        with self._lock:
            while self._requests:
                self._stop(self._requests[0], SchedulerClosedError("The scheduler was closed."))

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- submitting -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerClosedError("The scheduler is closed; it takes no more requests.")

    def _notify(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _prompt(
        self, tokenizer: Tokenizer, options: WindowOptions, initial: list[int]
    ) -> list[int]:
        return self._runner.prompt(
            tokenizer,
            initial,
            without_timestamps=options.without_timestamps,
            hotwords=options.hotwords,
        )

    # ---- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            key = self._next_key()
            if key is None:
                return
            try:
                limit = max(1, int(self._budget.max_batch(key, self.ready(key))))
            except Exception as exc:
                logger.warning("max_batch(%s) raised %r; failing the requests it held", key, exc)
                with self._lock:
                    for request in [
                        r for r in self._requests if any(w.key == key for w in r.eligible())
                    ]:
                        self._stop(request, _batch_failed(exc, 0))
                continue
            # Every batch max_batch sized runs under the budget's scope, even one that finds no
            # window left to take (size 0): that scope is where what max_batch reserved goes.
            windows = self._fill(key, limit)
            try:
                with self._budget.batch(key, len(windows)):
                    if windows:
                        self._decode(key, windows)
            except Exception as exc:  # the worker must survive anything a batch raises
                if windows:
                    self._fail_batch(windows, exc)
                else:
                    logger.warning("closing an empty batch raised %r", exc)

    def _next_key(self) -> BatchKey | None:
        """Wait for a window that may join a batch; the key of the batch to size next (None
        once the scheduler is closed)."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                self._drop_cancelled()
                head = next((r for r in self._requests if r.eligible()), None)
                if head is not None:
                    return head.eligible()[0].key
                self._wake.wait()

    def _fill(self, key: BatchKey, limit: int) -> list[_Window]:
        """Wait (at most ``max_wait_s`` after the oldest window) for ``limit`` windows with
        ``key``, and take them, round-robin over requests. Empty when none is left by then:
        their requests were cancelled, or the scheduler closed."""
        with self._lock:
            while not self._closed:
                self._drop_cancelled()
                ready = [w for r in self._requests for w in r.eligible() if w.key == key]
                if not ready:
                    break
                wait = min(w.queued_at for w in ready) + self._max_wait - time.monotonic()
                if len(ready) >= limit or wait <= 0:
                    break
                self._wake.wait(wait)
            if self._closed:
                return []
            windows = self._take(key, limit)
            if windows:
                self._batches += 1
                self._windows += len(windows)
                self._sizes[len(windows)] += 1
                if len({id(w.request) for w in windows}) > 1:
                    self._mixed += 1
            return windows

    def _take(self, key: BatchKey, limit: int) -> list[_Window]:
        """Up to ``limit`` windows with ``key``: one from each request in turn, starting with
        the least recently served, so one long upload does not starve short ones."""
        candidates = {id(r): [w for w in r.eligible() if w.key == key] for r in self._requests}
        taken: list[_Window] = []
        served: list[_Request] = []
        while len(taken) < limit and any(candidates.values()):
            for request in self._requests:
                queue = candidates[id(request)]
                if queue and len(taken) < limit:
                    window = queue.pop(0)
                    request.pending.remove(window)
                    request.in_flight += 1
                    taken.append(window)
                    if request not in served:
                        served.append(request)
        for request in served:
            self._requests.remove(request)
            self._requests.append(request)
        self._queued -= len(taken)
        return taken

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._requests if r.ticket.cancelled.is_set() or r.ticket._withdrawn]
        for request in gone:
            self._cancelled += len(request.pending)
            logger.info(
                "request cancelled; dropped %d queued windows of %d",
                len(request.pending),
                request.total,
            )
            self._stop(request, RequestCancelledError("The request was cancelled."))

    def _stop(self, request: _Request, error: BaseException) -> None:
        """End ``request`` with ``error`` (lock held): drop its queued windows."""
        self._queued -= len(request.pending)
        request.pending.clear()
        request.closed = True
        if request in self._requests:
            self._requests.remove(request)
        request.ticket._fail(error)

    def _fail_batch(self, windows: list[_Window], exc: Exception) -> None:
        requests = list({id(w.request): w.request for w in windows}.values())
        logger.warning(
            "a batch of %d windows from %d requests failed: %s: %s",
            len(windows),
            len(requests),
            type(exc).__name__,
            exc,
        )
        with self._lock:
            self._failed += 1
            for request in requests:
                request.in_flight = 0
                if not request.closed:
                    self._stop(request, _batch_failed(exc, len(windows)))

    # ---- decoding -------------------------------------------------------------------------

    def _decode(self, key: BatchKey, windows: list[_Window]) -> None:
        """Run one batch: encode, detect languages, generate, fall back, align, release."""
        runner = self._runner
        encoder_output = runner.encode([w.features for w in windows], chunk_length=key.chunk_length)

        undetected = [i for i, w in enumerate(windows) if w.request.tokenizer is None]
        if undetected:
            detected = runner.detect_language(encoder_output)
            with self._lock:
                for i in undetected:
                    request = windows[i].request
                    language, probability = detected[i]
                    request.tokenizer = runner.tokenizer(language, request.options.task)
                    request.prompt = self._prompt(
                        request.tokenizer, request.options, request.initial_tokens
                    )
                    request.ticket._set_language(language, probability)
                self._wake.notify_all()  # the rest of these requests' windows may go now

        tokenizers = [_tokenizer_of(w) for w in windows]
        results = runner.generate(
            encoder_output,
            [w.request.prompt for w in windows],
            suppress_tokens=runner.suppressed_tokens(tokenizers[0], key.suppress_tokens),
            **key.generate_options(),
        )

        finished: list[tuple[_Window, _Attempt, list[dict[str, Any]], int]] = []
        retry: list[_Window] = []
        for w, tokenizer, result in zip(windows, tokenizers, results, strict=True):
            tokens = list(result.sequences_ids[0])
            cum_logprob = result.scores[0] * (len(tokens) ** key.length_penalty)
            attempt = _Attempt(
                tokens=tokens,
                avg_logprob=cum_logprob / (len(tokens) + 1),
                no_speech_prob=float(result.no_speech_prob),
                compression_ratio=runner.compression_ratio(tokenizer.decode(tokens).strip()),
                temperature=key.temperature,
            )
            w.attempts.append(attempt)
            options = w.request.options
            failed = _needs_fallback(attempt, options)
            if failed and w.step + 1 < len(options.temperatures):
                retry.append(w)
                continue
            chosen = _best(w.attempts, options) if failed else attempt
            size = int(math.ceil(w.duration) * runner.frames_per_second)
            segments = runner.split_segments(
                tokenizer, chosen.tokens, offset=w.offset, size=size, duration=w.duration
            )
            finished.append((w, chosen, segments, size))

        alignments: dict[int, list[dict[str, Any]]] = {}
        if key.word_timestamps and finished:
            alignments = self._align(windows, finished, encoder_output)
        if key.logprobs and finished:
            self._score(key, windows, finished, encoder_output)

        with self._lock:
            for w in retry:
                w.step += 1
                w.key = w.request.options.batch_key(w.step, prefix_length=w.request.prefix_length)
                w.request.in_flight -= 1
                if not w.request.closed:
                    bisect.insort(w.request.pending, w, key=lambda x: x.index)
                    self._queued += 0 if w.request.inline else 1
                    self._fallbacks += 1
            for w, chosen, segments, size in finished:
                w.request.in_flight -= 1
                w.features = np.empty((0, 0), dtype=np.float32)  # free it; the result stays
                for s in segments:
                    text = _tokenizer_of(w).decode(s["tokens"])
                    s.update(
                        text=text,
                        compression_ratio=runner.compression_ratio(text),
                        avg_logprob=chosen.avg_logprob,
                        no_speech_prob=chosen.no_speech_prob,
                        seek=int(w.offset * runner.frames_per_second),
                    )
                w.request.decoded[w.index] = _Decoded(
                    segments, chosen.temperature, size, alignments.get(id(w))
                )
            ready = list({id(w.request): w.request for w, *_ in finished}.values())
        for request in ready:
            self._release(request)

    def _align(
        self,
        windows: list[_Window],
        finished: list[tuple[_Window, _Attempt, list[dict[str, Any]], int]],
        encoder_output: Any,
    ) -> dict[int, list[dict[str, Any]]]:
        """Word alignments of the finished windows, keyed by ``id(window)``.

        CTranslate2's ``align`` takes one start sequence per call and needs text for every item
        of the encoder output, so it runs once per (language, task) in the batch over all items
        (windows re-queued for fallback align their current text, which is discarded).
        """
        runner = self._runner
        chosen = {id(w): (attempt, segments, size) for w, attempt, segments, size in finished}
        eot = _tokenizer_of(windows[0]).eot
        text_tokens: list[list[int]] = []
        sizes: list[int] = []
        for w in windows:
            if id(w) in chosen:
                _, segments, size = chosen[id(w)]
                tokens = [t for s in segments for t in s["tokens"] if t < eot]
            else:
                tokens = [t for t in w.attempts[-1].tokens if t < eot]
                size = int(math.ceil(w.duration) * runner.frames_per_second)
            text_tokens.append(tokens)
            sizes.append(size)
        if not any(text_tokens):
            return {id(w): [] for w, *_ in finished}
        groups: dict[tuple[str, str], list[int]] = {}
        for i, w in enumerate(windows):
            if id(w) in chosen:
                language = _tokenizer_of(w).language_code
                groups.setdefault((language, w.request.options.task), []).append(i)
        aligned: dict[int, list[dict[str, Any]]] = {}
        for indices in groups.values():
            tokenizer = _tokenizer_of(windows[indices[0]])
            result = runner.find_alignment(tokenizer, text_tokens, encoder_output, sizes)
            for i in indices:
                aligned[id(windows[i])] = result[i]
        return aligned

    def _score(
        self,
        key: BatchKey,
        windows: list[_Window],
        finished: list[tuple[_Window, _Attempt, list[dict[str, Any]], int]],
        encoder_output: Any,
    ) -> None:
        """Set ``logprobs`` on the segments of the finished windows: every emitted token's
        log-probability from one forced pass over the batch (windows re-queued for fallback are
        scored with their current text, which is discarded)."""
        runner = self._runner
        chosen = {id(w): attempt for w, attempt, *_ in finished}
        tokenizer = _tokenizer_of(windows[0])
        sequences = [
            chosen[id(w)].tokens if id(w) in chosen else w.attempts[-1].tokens for w in windows
        ]
        blank = [*tokenizer.encode(" "), tokenizer.eot] if key.suppress_blank else None
        scores = runner.score(
            encoder_output,
            [w.request.prompt for w in windows],
            sequences,
            eot=tokenizer.eot,
            suppress_tokens=runner.suppressed_tokens(tokenizer, key.suppress_tokens),
            blank=blank,
        )
        by_window = {id(w): score for w, score in zip(windows, scores, strict=True)}
        for w, attempt, segments, _ in finished:
            pairs = list(zip(attempt.tokens, by_window[id(w)], strict=False))
            position = 0
            for segment in segments:
                taken: list[tuple[int, float]] = []
                for token in segment["tokens"]:
                    while position < len(pairs) and pairs[position][0] != token:
                        position += 1  # a timestamp token between segments
                    if position < len(pairs):
                        taken.append(pairs[position])
                        position += 1
                segment["logprobs"] = runner.token_logprobs(
                    _tokenizer_of(w), [t for t, _ in taken], [lp for _, lp in taken]
                )

    def _release(self, request: _Request) -> None:
        """Turn the request's finished windows into segments and hand them to its ticket,
        strictly in window order (word times depend on the window before)."""
        while True:
            with self._lock:
                if request.closed:
                    return
                decoded = request.decoded.pop(request.released, None)
            if decoded is None:
                return
            segments = self._segments(request, decoded)
            with self._lock:
                if request.closed:
                    return
                request.released += 1
                request.ticket._push(segments)
                if request.released == request.total:
                    request.closed = True
                    if request in self._requests:
                        self._requests.remove(request)
                    request.ticket._finish()

    def _segments(self, request: _Request, decoded: _Decoded) -> list[Segment]:
        """As ``BatchedInferencePipeline.forward`` + ``_batched_segments_generator``, for one
        window, then mapped from the speech-only timeline back to the audio's."""
        options = request.options
        if options.word_timestamps:
            assert request.tokenizer is not None
            last = self._runner.add_word_timestamps(
                decoded.segments,
                request.tokenizer,
                decoded.alignment or [],
                decoded.segment_size,
                prepend_punctuations=options.prepend_punctuations,
                append_punctuations=options.append_punctuations,
                last_speech_timestamp=request.last_speech_timestamp,
            )
            if last is not None:
                request.last_speech_timestamp = last
        segments = self._runner.restore_timestamps(
            decoded.segments,
            request.clips,
            temperature=decoded.temperature,
            with_words=options.word_timestamps,
            first_id=request.segment_id + 1,
        )
        if options.word_timestamps and request.speech:
            # Whisper's alignment hands pauses to words; move word edges onto the speech.
            segments = fit_segments(segments, request.speech, previous_end=request.last_word_end)
            if ends := [s.words[-1].end for s in segments if s.words]:
                request.last_word_end = ends[-1]
        request.segment_id += len(segments)
        return segments


# ---- helpers -------------------------------------------------------------------------------


def _tokenizer_of(window: _Window) -> Tokenizer:
    tokenizer = window.request.tokenizer
    assert tokenizer is not None, "a window is decoded only once its language is known"
    return tokenizer


def _needs_fallback(attempt: _Attempt, options: WindowOptions) -> bool:
    """WhisperModel.generate_with_fallback's test, for one window."""
    cr_limit, lp_limit = options.compression_ratio_threshold, options.log_prob_threshold
    too_repetitive = cr_limit is not None and attempt.compression_ratio > cr_limit
    too_unsure = lp_limit is not None and attempt.avg_logprob < lp_limit
    silence = (
        options.no_speech_threshold is not None
        and attempt.no_speech_prob > options.no_speech_threshold
        and too_unsure
    )
    return (too_repetitive or too_unsure) and not silence


def _best(attempts: list[_Attempt], options: WindowOptions) -> _Attempt:
    """When every temperature failed: the most likely attempt that was not too repetitive
    (or of all of them), reported at the last temperature, as faster-whisper does."""
    limit = options.compression_ratio_threshold
    pool = [a for a in attempts if limit is not None and a.compression_ratio <= limit]
    best = max(pool or attempts, key=lambda a: a.avg_logprob)
    return _Attempt(
        best.tokens,
        best.avg_logprob,
        best.no_speech_prob,
        best.compression_ratio,
        attempts[-1].temperature,
    )


def _batch_failed(exc: Exception, size: int) -> BatchFailedError:
    what = f"a batch of {size} windows" if size else "planning a batch"
    error = BatchFailedError(f"{what} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


__all__ = [
    "TEMPERATURES",
    "BatchBudget",
    "BatchFailedError",
    "BatchKey",
    "CallableBudget",
    "QueueFullError",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerError",
    "SchedulerStats",
    "Ticket",
    "WindowOptions",
]
