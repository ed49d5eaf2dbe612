"""The piece pipeline: one request, one piece of its audio at a time.

The audio is cut into pieces that fit host RAM (at pauses) -> for every piece the memory gate
reads the device and the planner returns a Plan -> the piece is read (decoded) under the plan's
host reservation and transcribed by a backend (:mod:`server.engine.backends`) -> an
out-of-memory error raises the cost estimate for that shape, steps the plan one rung down the
ladder and resumes from the last finished segment. The text of each piece conditions the next,
as sequential decoding does across windows. Diarization hears each piece as it is transcribed.
A call recorded with a side per channel is transcribed channel by channel.

A piece headed for the scheduler's shared batches does not wait for the one before it to end:
once every window of a piece has been taken by a batch, the next piece is planned, read and
queued (when the memory free then runs it as planned), so a batch worker that finishes first
finds its windows; the segments still come out in order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

from server.audio.pieces import Piece, PieceReader
from server.batching.windows import Ticket
from server.config import Settings
from server.diarization import Diarizer, speaker_shortfall
from server.engine.backends import MIN_PIECE_SAMPLES, Backend, Sequential, Windowed
from server.engine.placement import Placement
from server.engine.planning import RequestPlanner
from server.engine.pool import LoadedModel
from server.engine.report import Decisions, EngineStats
from server.engine.residency import Residency
from server.errors import (
    APIError,
    InsufficientMemoryError,
    RateLimitError,
    RequestCancelledError,
)
from server.memory import Plan, Shape, device_kind, step_down
from server.memory.gate import MemoryGate
from server.memory.host_heap import release_freed_memory
from server.memory.oom import is_out_of_memory
from server.request import Job
from server.transcript import Segment, Transcript, main_language
from server.whisper.runner import SAMPLE_RATE

logger = logging.getLogger(__name__)

OnSegment = Callable[[Segment, str | None], None]

_MAX_OOM_RETRIES = 4
# A piece may run this far past its planned length rather than leave a sliver after it (a
# header's duration is rounded; a tail this short is no piece of its own).
_PIECE_SLACK_S = 1.0


@dataclass
class _Progress:
    """How far one request has got: its segments, language, the prompt for the next piece
    and the degradations so far."""

    language: str | None
    prompt: str | list[int] | None
    on_decoded: Callable[[], None] | None = None
    segments: list[Segment] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)
    pieces: int = 0
    #: Model copies on other GPUs that pieces moved to, held until the request ends.
    models: ExitStack = field(default_factory=ExitStack)
    diarizer: Diarizer | None = None
    channel: int | None = None  # the channel being transcribed, when channels are speakers
    channels: list[int] = field(default_factory=list)  # each segment's channel
    streamed: int = 0  # diarized segments sent so far
    #: The next piece, planned, read and queued while the last batches of the one before ran.
    ahead: _Ahead | None = None


class PiecePipeline:
    """Runs requests piece by piece (see the module doc).

    Args:
        settings: Piece length, the ladder, Retry-After.
        gate: Settles the host's accounting when a request ends.
        models: Holds the models (and other GPUs' copies) and the speaker encoder.
        planner: Shapes and plans each piece.
        placement: Where each piece runs.
        decisions: Records how each request ended.
        stats: Counts running requests, degradations and OOM recoveries.
    """

    def __init__(
        self,
        settings: Settings,
        gate: MemoryGate,
        models: Residency,
        planner: RequestPlanner,
        placement: Placement,
        decisions: Decisions,
        stats: EngineStats,
    ) -> None:
        self.settings = settings
        self.gate = gate
        self.models = models
        self.planner = planner
        self.placement = placement
        self.decisions = decisions
        self.stats = stats
        self.sequential = Sequential()
        self.alone = Windowed(models, settings, queued=False)
        self.batched = Windowed(models, settings, queued=True)

    def run(
        self,
        model: LoadedModel,
        job: Job,
        on_segment: OnSegment | None,
        cancelled: threading.Event | None,
        on_decoded: Callable[[], None] | None,
    ) -> Transcript:
        """Transcribe ``job`` on ``model`` (blocking); see :meth:`Engine.run`."""
        run = _Progress(job.language, job.prompt, on_decoded)
        if job.diarization is not None:
            run.diarizer = Diarizer(self.models.speaker_encoder(), job.diarization)
        # A call recorded with a side per channel is transcribed channel by channel; anything
        # else is one source.
        sources = job.channels or (job.reader(),)
        duration = 0.0
        outcome = "error"
        try:
            with self.stats.counted_running():
                for channel, source in enumerate(sources):
                    reader = PieceReader(source)
                    run.channel = channel if job.channels else None
                    run.prompt = job.prompt
                    self._run_source(model, job, reader, run, on_segment, cancelled)
                    duration = max(duration, reader.position / SAMPLE_RATE)
            outcome = "ok"
        except APIError as exc:
            outcome = exc.code or str(exc.status)
            raise
        finally:
            run.models.close()
            release_freed_memory()
            self.gate.settle()
            self.decisions.finish(job.request_id, outcome)
        segments = run.segments
        if run.diarizer is not None:
            segments = self._label(job, run, on_segment)
        return Transcript(
            task=job.task,
            language=main_language(segments) or run.language or "en",
            duration=duration,
            segments=tuple(segments),
            degradations=tuple(run.degraded.items()),
        )

    def _label(self, job: Job, run: _Progress, on_segment: OnSegment | None) -> list[Segment]:
        """The request's segments with their speakers (diarized requests)."""
        assert run.diarizer is not None and job.diarization is not None
        segments = run.diarizer.label(run.segments, run.channels if job.channels else None)
        segments = [replace(s, id=n) for n, s in enumerate(segments)]
        shortfall = speaker_shortfall(job.diarization, segments, len(job.channels))
        if shortfall is not None:
            # Not a memory degradation (not counted as one), but reported like one.
            run.degraded["speakers"] = shortfall
            logger.warning("request %s: %s", job.request_id, shortfall)
        if job.channels and on_segment is not None:
            # Channels were transcribed one after the other: their segments are streamed once
            # all are known, in time order.
            for segment in segments:
                on_segment(segment, run.language)
        logger.info(
            "request %s: %d speakers in %d windows%s",
            job.request_id,
            len(run.diarizer.track.speakers),
            run.diarizer.windows,
            f" over {len(job.channels)} channels" if job.channels else "",
        )
        return segments

    def _run_source(
        self,
        model: LoadedModel,
        job: Job,
        reader: PieceReader,
        run: _Progress,
        on_segment: OnSegment | None,
        cancelled: threading.Event | None,
    ) -> None:
        """Transcribe one source (the audio, or one channel of it) piece by piece."""
        shape: Shape | None = None  # known once the first piece shows how long the audio is
        try:
            while run.ahead is not None or not reader.finished:
                shape = self._run_piece(model, job, reader, shape, run, on_segment, cancelled)
                if shape is None or (run.ahead is None and reader.finished):
                    break  # the caller's ``finally`` gives the last piece's memory back
                # The piece's samples, features and working memory are free now: give them
                # back to the kernel, so that RSS (and the planner's next reading) shows it.
                release_freed_memory()
                if run.segments and job.temperature == 0:
                    # Carry the text across pieces, as sequential decoding does across windows.
                    run.prompt = _context(run.segments)
        finally:
            if run.ahead is not None:  # the request failed or was cancelled: give it back
                run.ahead.held.close()
                run.ahead = None
        if run.pieces > 1:
            reader.log_cuts()
            logger.info(
                "request %s: %.0f s of audio in %d pieces",
                job.request_id,
                reader.position / SAMPLE_RATE,
                run.pieces,
            )

    def _run_piece(
        self,
        model: LoadedModel,
        job: Job,
        reader: PieceReader,
        shape: Shape | None,
        run: _Progress,
        on_segment: OnSegment | None,
        cancelled: threading.Event | None,
    ) -> Shape | None:
        """Plan, read and transcribe the next piece, retrying down the ladder after an
        out-of-memory error from the last finished segment.

        ``run.ahead`` holds the next piece when it was planned, read and queued while the last
        batches of the one before ran (see :meth:`_queue_ahead`): this piece is that one, and
        the piece after it is put there the same way.

        Returns:
            The shape for the pieces after this one; None when the audio was used up.
        """
        queued, run.ahead = run.ahead, None
        piece: Piece | None = queued.piece if queued is not None else None
        resume = 0  # samples of the piece already transcribed
        attempts = 0
        first = len(run.segments)  # the piece's first segment

        def on_drained() -> None:
            if run.ahead is None and shape is not None:
                run.ahead = self._queue_ahead(model, job, reader, shape, run, cancelled)

        try:
            while True:
                if cancelled is not None and cancelled.is_set():
                    raise RequestCancelledError("The client closed the request.")
                if queued is not None:
                    # The scope the piece was planned and read under, and its queued windows.
                    scope, plan, ticket, scheduled = queued.held, queued.plan, queued.ticket, True
                    fresh, queued = False, None
                else:
                    if piece is None and run.pieces and len(self.placement.places) > 1:
                        # Each piece of a long file goes where memory is free now.
                        place = self.placement.place_for(job, self._next_piece_seconds(job, reader))
                        if place != model.device:
                            model = run.models.enter_context(
                                self.models.use_model(job.source, place)
                            )
                    planned = shape or self.planner.requested_shape(model, job)
                    if piece is not None:
                        seconds = (len(piece.samples) - resume) / SAMPLE_RATE
                    else:
                        seconds = self._next_piece_seconds(job, reader)
                    slot = self.planner.sequential_slot(planned, job)
                    scheduled = slot is None
                    scope, ticket, fresh = ExitStack(), None, True
                # The piece's scope: its slot, its reservations, the samples read under them and
                # a CPU copy of the model, all released when the block ends, however it ends.
                with scope as held:
                    if fresh:
                        if slot is not None:
                            held.enter_context(slot)
                        plan = self.planner.plan_piece(
                            model, planned, seconds, job, held, scheduled=scheduled
                        )
                    if piece is None:
                        # Decoded under the plan's host reservation: the piece is what it paid for.
                        piece = reader.next(plan.host_chunk_seconds, slack_s=_PIECE_SLACK_S)
                        if piece is None:
                            return None
                        run.pieces += 1
                        if run.on_decoded is not None:
                            run.on_decoded()
                            run.on_decoded = None
                        if shape is None:
                            known = piece.duration_s if piece.last else None
                            shape = self.planner.requested_shape(model, job, known)
                            if shape != planned:
                                # The audio turned out short (or long): plan it as such.
                                self.decisions.finish(job.request_id, "replanned")
                                continue
                    self._note(run.degraded, plan, job)
                    if plan.device == device_kind(model.device):
                        runner = model
                    else:  # the CPU fallback: its copy is held for the piece, like the request's
                        runner = held.enter_context(
                            self.models.use_model(job.source, plan.device, planned=True)
                        )
                    try:
                        offset = (piece.start + resume) / SAMPLE_RATE
                        language = _piece_language(job, run)
                        produced: Iterator[tuple[Segment, str]]
                        if scheduled and len(piece.samples) - resume >= MIN_PIECE_SAMPLES:
                            if ticket is None:
                                ticket = self.batched.submit(
                                    runner, job, plan, piece.samples[resume:], language, cancelled
                                )
                            produced = self.batched.segments(
                                ticket, offset, len(run.segments), on_drained
                            )
                        else:
                            produced = self._backend(plan, scheduled).decode(
                                runner,
                                job,
                                plan,
                                piece.samples[resume:],
                                language,
                                run.prompt,
                                offset=offset,
                                first_id=len(run.segments),
                                cancelled=cancelled,
                            )
                        for segment, detected in produced:
                            run.language = run.language or detected
                            if segment.language is None:
                                segment = replace(segment, language=detected)
                            run.segments.append(segment)
                            run.channels.append(run.channel or 0)
                            if on_segment is not None and run.diarizer is None:
                                on_segment(segment, run.language)
                            resume = min(
                                len(piece.samples), round(segment.end * SAMPLE_RATE) - piece.start
                            )
                        if run.diarizer is not None:
                            # Under the piece's reservation, which counted the diarization's memory.
                            self._diarize_piece(run, piece, first, on_segment)
                        return shape
                    except Exception as exc:
                        if not is_out_of_memory(exc):
                            raise
                        error = exc
                # Out of memory: the piece's memory is given back (above); retry one rung down.
                attempts += 1
                self.stats.oom_recoveries += 1
                failed = plan.shape
                runner.cost = runner.cost.with_correction(failed, 1.5)
                shape = step_down(failed, self.settings.degrade_ladder)
                logger.warning(
                    "request %s: out of memory on %s with %s (%s); estimate raised, "
                    "retrying from %.1f s with %s",
                    job.request_id,
                    plan.device,
                    failed,
                    error,
                    (piece.start + resume) / SAMPLE_RATE,
                    shape,
                )
                run.degraded.setdefault("oom_retry", f"out of memory with {failed}; retried")
                if run.segments and job.temperature == 0:
                    run.prompt = _context(run.segments)
                if attempts > _MAX_OOM_RETRIES:
                    raise InsufficientMemoryError(
                        "The device ran out of memory repeatedly; retry later.",
                        retry_after=self.settings.retry_after,
                    ) from error
        finally:
            if queued is not None:  # taken from ``run.ahead`` but never run: give it back
                queued.held.close()

    def _queue_ahead(
        self,
        model: LoadedModel,
        job: Job,
        reader: PieceReader,
        shape: Shape,
        run: _Progress,
        cancelled: threading.Event | None,
    ) -> _Ahead | None:
        """Every window of the current piece has been taken by a batch: plan, read and queue
        the next piece now, so that a worker that finishes first finds its windows instead of
        waiting for the current piece's last batch and the next piece's cutting. Only where it
        changes nothing but the timing: the scheduler's windows hold no text of the piece
        before them, each piece detects its own languages (or the request's is known), one
        device, and the memory free now runs the piece as planned with no wait, degradation
        or eviction (:meth:`RequestPlanner.plan_ahead`). Otherwise nothing is queued, and the
        piece is planned as usual once this one has given its memory back.

        Returns:
            The queued piece (its scope holds its reservations, samples and windows: closing
            it withdraws the windows), or None.
        """
        language = _piece_language(job, run)
        if reader.finished or len(self.placement.places) > 1:
            return None
        if not job.per_region and language is None:
            return None
        held = ExitStack()
        try:
            plan = self.planner.plan_ahead(
                model, shape, self._next_piece_seconds(job, reader), job, held
            )
            if plan is None:
                held.close()
                return None
            piece = reader.next(plan.host_chunk_seconds, slack_s=_PIECE_SLACK_S)
            if piece is None:
                held.close()
                return None
            run.pieces += 1
            ticket = None
            if len(piece.samples) >= MIN_PIECE_SAMPLES:
                try:
                    ticket = self.batched.submit(
                        model, job, plan, piece.samples, language, cancelled
                    )
                except RateLimitError:
                    pass  # the queue is full: the piece is queued when its turn comes
                else:
                    held.callback(ticket.withdraw)
        except BaseException:
            held.close()
            raise
        self.stats.pieces_ahead += 1
        logger.debug("request %s: piece %d queued ahead", job.request_id, run.pieces)
        return _Ahead(held, plan, piece, ticket)

    def _backend(self, plan: Plan, scheduled: bool) -> Backend:
        """The scheduler's shared batches; or, holding a sequential slot, the same windowed
        decode alone, or faster-whisper's sequential ``transcribe``."""
        if scheduled:
            return self.batched
        return self.alone if plan.shape.batched else self.sequential

    def _next_piece_seconds(self, job: Job, reader: PieceReader) -> float:
        """How long the next piece will be, for planning before it is decoded: the rest of the
        audio as the header declares it, at most a piece."""
        cap = self.settings.max_piece_duration
        declared = job.duration
        if declared is None:
            return cap
        left = declared - reader.position / SAMPLE_RATE
        # A header that promised less than there is: go on in pieces of the usual length.
        return min(cap, left if left > _PIECE_SLACK_S else self.settings.chunk_length)

    @staticmethod
    def _diarize_piece(
        run: _Progress, piece: Piece, first: int, on_segment: OnSegment | None
    ) -> None:
        """Add a transcribed piece's voices to the request's speakers; when streaming one
        source, send its segments labelled (the final transcript is labelled again at the end,
        with the same speakers and splits, and names that may have been confirmed since)."""
        assert run.diarizer is not None
        run.diarizer.add_piece(piece.samples, piece.start_s, channel=run.channel)
        if on_segment is None or run.channel is not None:
            return
        for segment in run.diarizer.label(run.segments[first:]):
            on_segment(replace(segment, id=run.streamed), run.language)
            run.streamed += 1

    def _note(self, degraded: dict[str, str], plan: Plan, job: Job) -> None:
        """Record each kind of degradation once per request, and log it once."""
        for d in plan.degradations:
            if d.kind not in degraded:
                degraded[d.kind] = d.reason
                self.stats.degradations[d.kind] += 1
                logger.warning("request %s degraded (%s): %s", job.request_id, d.kind, d.reason)


@dataclass
class _Ahead:
    """The next piece of a request, planned, read and queued before the current one ended."""

    held: ExitStack  # its reservations and samples; closing it withdraws its windows
    plan: Plan
    piece: Piece
    ticket: Ticket | None  # None: not queued yet (the queue was full)


def _piece_language(job: Job, run: _Progress) -> str | None:
    """The language a piece is decoded in: detected per stretch, every piece detects its own
    (None, unless given); else the first piece's holds for the request."""
    return job.language if job.per_region else run.language


def _context(segments: list[Segment]) -> list[int]:
    """The tokens that condition the next window, as sequential decoding keeps them: the
    recent segments' tokens with their timestamp tokens (Whisper keeps the last 223)."""
    tokens: list[int] = []
    for segment in segments[-16:]:
        tokens.extend(segment.tokens)
    return tokens[-223:]


__all__ = ["OnSegment", "PiecePipeline"]
