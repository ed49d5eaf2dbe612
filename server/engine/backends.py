"""The two ways a piece is decoded, behind one interface.

- :class:`Sequential`: faster-whisper's own ``transcribe``, each window conditioned on the text
  before it: exactly faster-whisper's results (WHISPER_BATCHING=off).
- :class:`Windowed`: window by window, as the cross-request scheduler decodes them, either
  queued for its shared batches or alone in the caller's thread (a batch of one): one
  procedure, so a request gets the same text whichever path it took.

Both yield each segment as soon as it is final, with the language given or detected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import numpy as np

from server.batching.scheduler import BatchFailedError, QueueFullError, Ticket
from server.batching.windows import DRAINED
from server.config import Settings
from server.engine.pool import LoadedModel
from server.engine.residency import Residency
from server.errors import APIError, RateLimitError, RequestCancelledError
from server.memory import Plan
from server.request import Job
from server.transcript import Segment
from server.whisper.runner import (
    SAMPLE_RATE,
    has_speech,
    speech_timestamps,
    to_segment,
)
from server.whisper.word_timing import fit_segments, speech_spans

logger = logging.getLogger(__name__)

MIN_PIECE_SAMPLES = SAMPLE_RATE // 100  # shorter than 10 ms: nothing to transcribe
# Silero VAD as the scheduler cuts windows with it (faster-whisper's batched defaults).
_SPEECH_GATE = {"min_silence_duration_ms": 160}
# A sequential piece longer than two windows in which the VAD hears speech less than half the
# time is decoded with the VAD filter on (shorter ones stay exactly faster-whisper's results).
_SPARSE_CHECK_SAMPLES = 60 * SAMPLE_RATE
_SPARSE_SPEECH = 0.5


class Backend(Protocol):
    """Decodes one piece of a request under its plan."""

    def decode(
        self,
        model: LoadedModel,
        job: Job,
        plan: Plan,
        audio: np.ndarray,
        language: str | None,
        prompt: str | list[int] | None,
        *,
        offset: float,
        first_id: int,
        cancelled: threading.Event | None,
    ) -> Iterator[tuple[Segment, str]]:
        """The piece's segments, each as soon as it is final, with the language.

        Args:
            model: The model to decode with.
            job: The request's options.
            plan: The piece's plan (its shape may be degraded).
            audio: The piece's samples (16 kHz mono float32).
            language: Given, or detected on an earlier piece.
            prompt: The client's prompt, or the tokens of the text before this piece.
            offset: Seconds from the start of the audio to the piece's first sample.
            first_id: The id of the piece's first segment.
            cancelled: Set when the client has gone; decoding stops at the next window.
        """
        ...


class Sequential:
    """faster-whisper's ``transcribe`` (see the module doc)."""

    def decode(
        self,
        model: LoadedModel,
        job: Job,
        plan: Plan,
        audio: np.ndarray,
        language: str | None,
        prompt: str | list[int] | None,
        *,
        offset: float,
        first_id: int,
        cancelled: threading.Event | None,
    ) -> Iterator[tuple[Segment, str]]:
        if len(audio) < MIN_PIECE_SAMPLES or not has_speech(audio, _SPEECH_GATE):
            # Nothing the VAD hears as speech, at any level (it hears a copy brought to one
            # level, server.audio.loudness): Whisper would only fail its fallback tests at
            # every temperature over it, at many times the cost of speech, and at best return
            # nothing (at worst a hallucinated "you"). The scheduler's windows are cut at speech
            # already, so this matters for the sequential path only.
            logger.debug(
                "request %s: no speech in %.2f s; skipped", job.request_id, len(audio) / SAMPLE_RATE
            )
            return
        options = job.transcribe_options(plan.shape, language=language, prompt=prompt)
        if not options["vad_filter"] and len(audio) > _SPARSE_CHECK_SAMPLES:
            gated = speech_timestamps(audio, _SPEECH_GATE)
            share = sum(s["end"] - s["start"] for s in gated) / len(audio)
            if share < _SPARSE_SPEECH:
                # Mostly pauses (a meeting, a recording left running): Whisper would decode
                # every silent window, many of them at every temperature. Decode the speech
                # only, with faster-whisper's own VAD filter.
                options["vad_filter"] = True
                logger.debug(
                    "request %s: %.0f%% speech in %.0f s; VAD filter on",
                    job.request_id,
                    100 * share,
                    len(audio) / SAMPLE_RATE,
                )
        # Word edges are fitted to the speech, as on the windowed path.
        spans = speech_spans(audio) if options["word_timestamps"] else []
        previous_end: float | None = None
        raw, detected = model.runner.transcribe(audio, options)
        for n, s in enumerate(raw):
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelledError("The client closed the request.")
            if spans and s.words:
                (s,) = fit_segments([s], spans, previous_end=previous_end)
                previous_end = s.words[-1].end
            yield to_segment(s, offset, first_id + n), detected


class Windowed:
    """The scheduler's window-by-window decode (see the module doc). The text before the piece
    is not a prompt: windows are decoded in parallel.

    Args:
        models: Each model's scheduler.
        settings: For the Retry-After of a full batch queue.
        queued: Queue the windows for shared batches; otherwise decode them alone, in the
            caller's thread (a caller holding a sequential slot).
    """

    def __init__(self, models: Residency, settings: Settings, *, queued: bool) -> None:
        self.models = models
        self.settings = settings
        self.queued = queued

    def decode(
        self,
        model: LoadedModel,
        job: Job,
        plan: Plan,
        audio: np.ndarray,
        language: str | None,
        prompt: str | list[int] | None,
        *,
        offset: float,
        first_id: int,
        cancelled: threading.Event | None,
    ) -> Iterator[tuple[Segment, str]]:
        if len(audio) < MIN_PIECE_SAMPLES:
            return
        yield from self.segments(
            self.submit(model, job, plan, audio, language, cancelled), offset, first_id
        )

    def submit(
        self,
        model: LoadedModel,
        job: Job,
        plan: Plan,
        audio: np.ndarray,
        language: str | None,
        cancelled: threading.Event | None,
    ) -> Ticket:
        """Cut the piece into windows and queue them (or set them up to be decoded in the
        thread that reads the ticket), now.

        Raises:
            RateLimitError: the batch queue is full.
        """
        options = job.window_options(plan.shape, language=language)
        scheduler = self.models.scheduler(model)
        try:
            return (scheduler.submit if self.queued else scheduler.decode)(
                audio, options, cancelled=cancelled
            )
        except QueueFullError as exc:
            raise RateLimitError(
                f"The batch queue is full ({exc}); retry after the delay in Retry-After.",
                retry_after=self.settings.retry_after,
            ) from exc

    @staticmethod
    def segments(
        ticket: Ticket,
        offset: float,
        first_id: int,
        on_drained: Callable[[], None] | None = None,
    ) -> Iterator[tuple[Segment, str]]:
        """A submitted piece's segments, with the language given or detected. ``on_drained``
        is called (in this thread) once every window of the piece has been taken by a batch,
        while the workers decode them: the caller's chance to queue its next piece."""
        try:
            n = 0
            while True:
                try:
                    item = ticket.next_or_drained(tell=on_drained is not None)
                except StopIteration:
                    return
                if item is DRAINED:
                    assert on_drained is not None
                    on_drained()
                    continue
                yield to_segment(cast(Any, item), offset, first_id + n), ticket.language or "en"
                n += 1
        except BatchFailedError as exc:
            if isinstance(exc.__cause__, APIError):
                raise exc.__cause__ from exc
            raise
        finally:
            ticket.withdraw()  # stopped early (an error, the caller gone): drop the rest


__all__ = ["MIN_PIECE_SAMPLES", "Backend", "Sequential", "Windowed"]
