"""What the scheduler queues: a request's windows (:class:`QueuedRequest`, :class:`Window`, each
decoding :class:`Attempt`, a :class:`Decoded` window waiting for its turn), the :class:`Ticket`
its caller iterates, and the scheduler's errors."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from server.batching.languages import Run
from server.batching.options import BatchKey, WindowOptions
from server.errors import RequestCancelledError
from server.whisper.word_timing import Span

if TYPE_CHECKING:
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import Segment


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


# ---- requests and their windows ------------------------------------------------------------


@dataclass
class Attempt:
    """One decoding of a window at one temperature."""

    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float


@dataclass
class Window:
    request: QueuedRequest
    index: int
    features: np.ndarray  # log-Mel features, not yet padded to 30 s
    offset: float  # seconds on the request's speech-only timeline
    duration: float
    queued_at: float
    step: int = 0  # index into the request's temperatures
    key: BatchKey = field(default_factory=BatchKey)
    attempts: list[Attempt] = field(default_factory=list)
    part: bool = False  # a part of a window decoded on its own (text stopped early, languages)
    # Detected per stretch (WindowOptions.per_region): the window's runs of one language, and
    # the tokenizer and prompt of the language it is decoded in. None: the request's.
    runs: list[Run] = field(default_factory=list)
    tokenizer: Tokenizer | None = None
    prompt: list[int] | None = None

    def fall_back(self) -> None:
        """Move the window to its request's next temperature (its key changes with it)."""
        self.step += 1
        self.key = self.request.key(self.step)


@dataclass
class Decoded:
    """A finished window: its segments (speech-only timeline) and, with word timestamps,
    its word alignment, applied when the window is released in order. A window decoded again
    in parts (its text stopped early, or it holds several languages) holds the parts, each
    with its own alignment and language."""

    segments: list[dict[str, Any]]
    temperature: float
    segment_size: int
    alignment: list[dict[str, Any]] | None
    parts: list[Decoded] = field(default_factory=list)
    tokenizer: Tokenizer | None = None  # the language it was decoded in

    @classmethod
    def joined(
        cls, parts: list[Decoded], segment_size: int, tokenizer: Tokenizer | None = None
    ) -> Decoded:
        """A window decoded in ``parts`` (its text stopped early, or it holds several
        languages): their segments in order, at the highest temperature any part needed."""
        return cls(
            [s for p in parts for s in p.segments],
            max(p.temperature for p in parts),
            segment_size,
            None,
            parts=parts,
            tokenizer=tokenizer,
        )


class QueuedRequest:
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
        self.pending: list[Window] = []  # queued, in window order
        self.in_flight = 0
        self.total = 0
        self.decoded: dict[int, Decoded] = {}
        self.released = 0  # windows handed to the ticket, in order
        self.segment_id = 0
        self.last_speech_timestamp = 0.0
        self.speech: list[Span] = []  # fine-grained speech, to fit word edges to
        self.last_word_end: float | None = None
        self.closed = False
        self.inline = False  # decoded by Scheduler.decode in its caller's thread, never queued
        # What the scheduling policy reads (server.batching.policy.Waiting).
        self.work_class = options.work_class
        self.waiting_since = time.monotonic()  # since its next window has waited
        self.skipped = 0  # batches run without it while it had a window ready
        # Languages detected per stretch: each window's last language (the next window's
        # starting point), and each language's prompt.
        self.last_languages: dict[int, str] = {}
        self.prompts: dict[str, tuple[Tokenizer, list[int]]] = {}

    def key(self, step: int) -> BatchKey:
        """The batch key of this request's windows at fallback step ``step``."""
        return self.options.batch_key(step, prefix_length=self.prefix_length)

    def eligible(self) -> list[Window]:
        """Queued windows that may join a batch now. Until the language is known only the
        first window may, since detection runs on its encoder output (unless each window's
        languages are detected on its own)."""
        if self.tokenizer is not None or self.options.per_region:
            return self.pending
        return self.pending[:1] if self.pending and self.pending[0].index == 0 else []


# ---- the ticket ----------------------------------------------------------------------------

#: What :meth:`Ticket.next_or_drained` returns once every window has been taken by a batch.
DRAINED = object()


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
        self._drained = False  # every window has been taken by a batch
        self._drained_told = False
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

    @property
    def stopped(self) -> bool:
        """Whether the caller cancelled or withdrew the request (its remaining work is waste)."""
        return self.cancelled.is_set() or self._withdrawn

    def cancel(self) -> None:
        """Cancel the request: its queued windows are dropped before the next batch."""
        self.cancelled.set()
        self._wake()

    def withdraw(self) -> None:
        """Drop the request's queued windows before the next batch, as :meth:`cancel` does,
        without setting the ``cancelled`` event (the caller's, which may stand for more than
        this ticket): for a caller that stops reading the ticket before its end. Nothing once
        the ticket is done."""
        if self.done:
            return
        self._withdrawn = True
        self._wake()

    def __iter__(self) -> Ticket:
        return self

    def __next__(self) -> Segment:
        return cast("Segment", self.next_or_drained(tell=False))

    def next_or_drained(self, *, tell: bool = True) -> Segment | object:
        """The next segment, as ``next`` gives it; but once, when every window of the request
        has been taken by a batch while no segment is ready yet, :data:`DRAINED` instead: the
        caller may prepare its next request meanwhile (the workers go on with these windows,
        and their segments wait here). A window sent back for a fallback is queued again, so
        the news is a hint, not a promise."""
        while True:
            with self._cond:
                if self._segments:
                    return self._segments.popleft()
                told = self._drained_told or self._finished or self._error is not None
                if tell and self._drained and not told:
                    self._drained_told = True
                    return DRAINED
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
    def _drain(self) -> None:
        self._drained = True
        self._cond.notify_all()

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


__all__ = [
    "DRAINED",
    "Attempt",
    "BatchFailedError",
    "Decoded",
    "QueueFullError",
    "QueuedRequest",
    "SchedulerClosedError",
    "SchedulerError",
    "Ticket",
    "Window",
]
