"""The serving layer behind the audio routes: form -> decoded audio -> engine -> rendered
response, with admission, timeouts, client disconnects and streaming."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from typing import Any

import anyio
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.admission import Admission
from server.api.formats import (
    degradations_body,
    render,
    segment_event,
    segment_id,
    sse,
    text_delta_event,
    text_done_event,
)
from server.api.protocol import Task, TranscriptionRequest, parse_form
from server.api.work import Work
from server.audio.decode import ALL_CHANNELS, AudioStream
from server.audio.decoders import DecoderPool, DecoderStream
from server.audio.pieces import AudioSource
from server.audio.upload import Upload
from server.chinese import convert_segment, convert_transcript, is_chinese
from server.config import Settings
from server.diarization import DiarizationOptions
from server.diarization.channels import MAX_CHANNELS, ChannelSource, measure
from server.engine.core import Engine
from server.errors import (
    APIError,
    AudioError,
    InvalidRequestError,
    RequestCancelledError,
    RequestTimeoutError,
)
from server.metrics import Metrics
from server.request import Job
from server.transcript import Segment, Transcript

logger = logging.getLogger(__name__)
_KEEPALIVE_S = 10.0
_DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is there
_MAX_FIELDS = 64
# OpenAI: reference clips of 2-10 s; a little either side is let through (encoders pad).
_REFERENCE_SECONDS = (1.8, 10.5)


async def read_form(request: Request, settings: Settings, owner: ExitStack) -> dict[str, list[Any]]:
    """Read the multipart form into ``name -> [values]``, files as
    :class:`~server.audio.upload.Upload`: a file part the parser spooled to disk stays there, and
    ``owner`` closes every upload (which removes its file) when it is closed.

    Raises:
        RequestCancelledError: the client went away before the upload finished.
    """
    # A text part may hold a known speaker's reference clip as a data URL: 10 s of 48 kHz
    # stereo WAV is 2.6 MB in base64.
    part_limit = max(4 << 20, settings.max_prompt_chars * 4 + 1024)
    try:
        async with request.form(
            max_files=4, max_fields=_MAX_FIELDS, max_part_size=part_limit
        ) as form:
            fields: dict[str, list[Any]] = {}
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    upload = owner.enter_context(Upload.take_over(value.file))
                    fields.setdefault(name, []).append(upload)
                else:
                    fields.setdefault(name, []).append(value)
            return fields
    except ClientDisconnect as exc:
        raise RequestCancelledError(
            "The client closed the connection before the upload finished."
        ) from exc


def form_memory(form: dict[str, list[Any]]) -> int:
    """Bytes of host RAM a parsed form holds: its text fields, and its uploads that are not
    on disk."""
    total = 0
    for values in form.values():
        for value in values:
            total += value.memory_bytes if isinstance(value, Upload) else len(value)
    return total


class TranscriptionService:
    """Serves ``/v1/audio/transcriptions`` and ``/v1/audio/translations``."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        decoders: DecoderPool,
        admission: Admission,
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.settings = settings
        self.metrics = metrics
        self.decoders = decoders

    async def handle(self, request: Request, task: Task) -> Response:
        settings = self.settings
        engine = self.engine
        key_id = getattr(request.state, "api_key_id", None)
        request_id = getattr(request.state, "request_id", "-")
        # Everything the request holds (its uploads, admission slot, memory hold, open audio)
        # goes into one scope. Until the engine starts, this coroutine closes it on the way
        # out; from then on the work owns it (server.api.work), and closes it when the worker
        # stops, however this coroutine ends.
        with ExitStack() as scope:
            scope.callback(engine.settle)  # last: read the footprint once all is released
            scope.callback(engine.release_leftovers, request_id)
            form = await read_form(request, settings, scope)
            req = parse_form(
                form,
                task=task,
                max_beam_size=settings.max_beam_size,
                max_prompt_chars=settings.max_prompt_chars,
            )
            source = engine.resolve(req.model)
            scope.enter_context(self.admission.admit(key_id))
            # What of the form is in memory (text fields, small uploads, the reference clips
            # decoded from their data URLs) is counted against host RAM while it is held; an
            # upload spooled to disk is not.
            held = form_memory(form) + sum(len(r) for r in req.known_speaker_references)
            scope.enter_context(engine.hold_upload(held, request_id, key_id))
            # Only the header is read here; the engine decodes the audio piece by piece, each
            # under the planner's reservation.
            audio, diarization, channels = await anyio.to_thread.run_sync(self._open, req, scope)
            job = Job.from_request(
                req,
                request_id=request_id,
                api_key=key_id,
                audio=audio,
                source=source,
                default_beam_size=settings.default_beam_size,
                chinese_script=settings.chinese_script,
                diarization=diarization,
                channels=channels,
                diarization_words=settings.diarization_words,
            )
            if req.stream:
                return await self._start_stream(job, req, scope.pop_all())
            work = Work.start(
                engine.executor,
                lambda cancelled: engine.run(job, cancelled=cancelled),
                scope.pop_all(),
            )
        started = time.perf_counter()
        try:
            transcript = await self._wait(work, request)
        except APIError as exc:
            self._finished(job, req, started, None, exc)
            raise
        self._finished(job, req, started, transcript, None)
        return self._render(convert_transcript(transcript, job.chinese), req)

    def _open(
        self, req: TranscriptionRequest, scope: ExitStack
    ) -> tuple[AudioStream | DecoderStream, DiarizationOptions | None, tuple[AudioSource, ...]]:
        """Open the upload's audio (in a decoder process) and, diarized, its options and
        channels (blocking). Each handle is put in ``scope`` here, in the thread that opens
        it, so that none is lost when the request is cancelled while this runs."""
        audio = self.decoders.open(req.file, max_duration=self.settings.max_audio_duration)
        scope.callback(audio.close)
        if not req.diarize:
            return audio, None, ()
        diarization, channels = self._diarization(req, audio, scope)
        return audio, diarization, channels

    def _diarization(
        self, req: TranscriptionRequest, audio: AudioStream | DecoderStream, slot: ExitStack
    ) -> tuple[DiarizationOptions, tuple[AudioSource, ...]]:
        """A diarized request's options (its reference clips decoded), and, when its channels
        are the speakers, a source per channel, closed by ``slot`` (blocking).

        Raises:
            DiarizationUnavailableError: the speaker encoder is not installed.
            InvalidRequestError: a reference clip is not 2-10 s of audio, or
                ``diarize_by_channel=on`` for a file of more than MAX_CHANNELS channels.
        """
        self.engine.speaker_encoder()  # a 400 now, before anything is decoded, if missing
        references = []
        for index, (name, data) in enumerate(
            zip(req.known_speaker_names, req.known_speaker_references, strict=True)
        ):
            try:
                clip = self.decoders.decode(Upload(data), max_duration=60.0)
            except AudioError as exc:
                raise InvalidRequestError(
                    f"known_speaker_references[{index}] ({name!r}) is not audio the server can "
                    f"decode: {exc.message}",
                    param="known_speaker_references",
                    code=exc.code,
                ) from exc
            lo, hi = _REFERENCE_SECONDS
            if not lo <= clip.duration <= hi:
                raise InvalidRequestError(
                    f"known_speaker_references[{index}] ({name!r}) is {clip.duration:.1f} s "
                    "long; send a clip of 2 to 10 seconds of that person speaking.",
                    param="known_speaker_references",
                )
            references.append((name, clip.samples))
        options = DiarizationOptions(
            min_speakers=req.min_speakers,
            max_speakers=req.max_speakers,
            references=tuple(references),
            by_channel=req.diarize_by_channel,
        )
        count = audio.info.source_channels
        if count < 2 or req.diarize_by_channel == "off":
            return options, ()
        if count > MAX_CHANNELS:
            if req.diarize_by_channel == "on":
                raise InvalidRequestError(
                    f"diarize_by_channel=on takes files of up to {MAX_CHANNELS} channels, one "
                    f"speaker each; this one has {count}. Send diarize_by_channel=auto or off "
                    "to diarize the channels mixed down to one.",
                    param="diarize_by_channel",
                    code="too_many_channels",
                )
            logger.info(
                "diarizing %d channels as one: more than the %d diarized one by one",
                count,
                MAX_CHANNELS,
            )
            return options, ()
        limit = self.settings.max_audio_duration
        with contextlib.closing(
            self.decoders.open(req.file, max_duration=limit, channel=ALL_CHANNELS)
        ) as every_channel:
            levels = measure(every_channel)
        if req.diarize_by_channel == "auto" and not levels.separate:
            logger.info(
                "diarizing %d channels as one: they carry the same voices (waveform r=%.2f, "
                "envelope r=%.2f)",
                count,
                levels.correlation,
                levels.envelope_correlation,
            )
            return options, ()
        logger.info(
            "diarizing by channel: %d channels (waveform r=%.2f, envelope r=%.2f, %s)",
            count,
            levels.correlation,
            levels.envelope_correlation,
            req.diarize_by_channel,
        )
        sources = []
        for c in range(levels.levels.shape[0]):
            stream = self.decoders.open(req.file, max_duration=limit, channel=c)
            slot.callback(stream.close)
            sources.append(ChannelSource(stream, c, levels.gain(c)))
        return options, tuple(sources)

    def _finished(
        self,
        job: Job,
        req: TranscriptionRequest,
        started: float,
        transcript: Transcript | None,
        error: APIError | None,
    ) -> None:
        """One log line and the metrics for a finished request."""
        elapsed = time.perf_counter() - started
        outcome = "ok" if error is None else (error.code or str(error.status))
        self.metrics.transcriptions.labels(job.task, req.response_format.value, outcome).inc()
        if transcript is not None:
            self.metrics.audio_seconds.inc(transcript.duration)
            if transcript.duration > 0:
                self.metrics.rtf.observe(elapsed / transcript.duration)
        plan = next(
            (d for d in reversed(self.engine.stats.recent) if d["request_id"] == job.request_id),
            None,
        )
        logger.info(
            "request %s model=%s task=%s format=%s audio_s=%.1f plan=%s degraded=%s "
            "outcome=%s elapsed_s=%.2f",
            job.request_id,
            job.source.id,
            job.task,
            req.response_format.value,
            transcript.duration if transcript else job.duration or 0.0,
            "-"
            if plan is None
            else f"{plan['device']}/b{plan['batch_size']}/beam{plan['beam_size']}"
            f"/{plan['chunk_length']}s{'/words' if plan['word_timestamps'] else ''}",
            ",".join(k for k, _ in transcript.degradations) if transcript else "-",
            outcome,
            elapsed,
        )

    async def _wait(self, work: Work[Transcript], request: Request) -> Transcript:
        """The transcript, once the work has ended; the work is cancelled when the client
        disconnects (checked every half second) and when this wait ends for any other reason
        (a timeout, this coroutine cancelled)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        try:
            while not await work.wait(min(_DISCONNECT_POLL_S, max(0.0, deadline - loop.time()))):
                if loop.time() >= deadline:
                    # Answer once the engine has stopped (at its next window), so that a
                    # client that got its 504 finds the slot free. Only the answer waits: the
                    # work releases what it holds whether or not anyone waits for it.
                    work.cancel()
                    await work.wait()
                    raise RequestTimeoutError(
                        f"Transcription took longer than WHISPER_REQUEST_TIMEOUT="
                        f"{self.settings.request_timeout:g}s; send a shorter file."
                    )
                if not work.cancelled.is_set() and await request.is_disconnected():
                    logger.info("request %s: client disconnected", request.state.request_id)
                    work.cancel()  # the engine stops at its next window and raises
            return work.result()
        finally:
            # The work still owns the admission slot and the memory until its worker stops.
            work.cancel()

    def _render(self, transcript: Transcript, req: TranscriptionRequest) -> Response:
        granularities = req.granularities
        if any(kind == "word_timestamps" for kind, _ in transcript.degradations):
            # Words were dropped to fit memory: the segments carry the timing instead.
            granularities = granularities | {"segment"}
        body, media_type = render(
            transcript, req.response_format, granularities=granularities, logprobs=req.logprobs
        )
        headers = {}
        if transcript.degradations:
            headers["X-Whisper-Degraded"] = ",".join(kind for kind, _ in transcript.degradations)
        if isinstance(body, dict):
            return JSONResponse(body, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    async def _start_stream(
        self, job: Job, req: TranscriptionRequest, scope: ExitStack
    ) -> Response:
        """Start the engine and answer with server-sent events once the first piece of audio
        has decoded. Until then a failure (an upload that is not audio, no memory) is still an
        ordinary error response with its status; after it, an ``error`` event."""
        loop = asyncio.get_running_loop()
        # What the worker reports, in order: _DECODED, segments, then _ENDED once it has
        # stopped and released everything.
        events: asyncio.Queue[Segment | _Mark] = asyncio.Queue()
        started = time.perf_counter()

        def on_segment(segment: Segment, language: str | None) -> None:
            if is_chinese(job.task, language):
                segment = convert_segment(segment, job.chinese)
            loop.call_soon_threadsafe(events.put_nowait, segment)

        def on_decoded() -> None:
            loop.call_soon_threadsafe(events.put_nowait, _DECODED)

        work = Work.start(
            self.engine.executor,
            lambda cancelled: self.engine.run(
                job, on_segment=on_segment, cancelled=cancelled, on_decoded=on_decoded
            ),
            scope,
        )
        work.add_done_callback(lambda: events.put_nowait(_ENDED))
        # Logged and counted when the work ends, whether or not anyone reads the stream then.
        work.add_done_callback(lambda: self._report(job, req, started, work))
        try:
            first = await events.get()
            if first is _ENDED and (error := work.exception()) is not None:
                raise error
        except BaseException:
            work.cancel()
            raise
        return _EventStream(
            self._stream(job, req, work, events, first),
            work,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @staticmethod
    def _events(segment: Segment, req: TranscriptionRequest) -> bytes:
        """A segment's events: its text as a delta, and, diarized, the segment with its
        speaker after it."""
        logprobs = (segment.logprobs or ()) if req.logprobs else None
        if not req.diarize:
            return sse(text_delta_event(segment.text, logprobs))
        delta = text_delta_event(segment.text, logprobs, segment=segment_id(segment))
        return sse(delta) + (sse(segment_event(segment)) if segment.text.strip() else b"")

    async def _stream(
        self,
        job: Job,
        req: TranscriptionRequest,
        work: Work[Transcript],
        events: asyncio.Queue[Segment | _Mark],
        first: Segment | _Mark,
    ) -> AsyncIterator[bytes]:
        try:
            item = first
            while item is not _ENDED:
                if item is _KEEPALIVE:
                    yield b": keep-alive\n\n"
                elif isinstance(item, Segment):
                    yield self._events(item, req)
                item = await _next_event(events)
            try:
                transcript = work.result()
            except APIError as exc:
                yield sse({"type": "error", **exc.body()})
                return
            transcript = convert_transcript(transcript, job.chinese)
            done_event: dict[str, Any] = text_done_event(
                transcript.text,
                transcript.duration,
                transcript.logprobs if req.logprobs else None,
            )
            if transcript.degradations:
                done_event["x_whisper_degraded"] = degradations_body(transcript)
            yield sse(done_event)
        finally:
            work.cancel()  # the client went: the work stops and releases what it holds

    def _report(
        self, job: Job, req: TranscriptionRequest, started: float, work: Work[Transcript]
    ) -> None:
        """:meth:`_finished` for work that has ended: with its transcript or its error."""
        error = work.exception()
        if error is None:
            self._finished(job, req, started, work.result(), None)
        elif isinstance(error, APIError):
            self._finished(job, req, started, None, error)


class _Mark:
    """A marker in a stream's queue of events."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_DECODED = _Mark("decoded")  # the first piece decoded: the upload is audio
_ENDED = _Mark("ended")  # the work has stopped and released what the request held
_KEEPALIVE = _Mark("keep-alive")  # nothing came for a while


async def _next_event(events: asyncio.Queue[Segment | _Mark]) -> Segment | _Mark:
    """The next event, or :data:`_KEEPALIVE` after a quiet while. No task of its own is left
    behind: ``wait_for`` cancels and awaits its read however this ends (the old stream's
    pending reads were what "Task was destroyed but it is pending!" reported)."""
    try:
        return await asyncio.wait_for(events.get(), _KEEPALIVE_S)
    except TimeoutError:
        return _KEEPALIVE


class _EventStream(StreamingResponse):
    """A stream of server-sent events from running work. Once the response ends, however it
    ends (sent in full, the client gone, cancelled before its body was ever iterated), the
    work is asked to stop: a body that never starts has no ``finally`` of its own."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        work: Work[Transcript],
        *,
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._work = work

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._work.cancel()
