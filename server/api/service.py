"""The transcription service behind the audio routes: form -> request -> job (the request
factory) -> engine -> rendered response.

Around that line, and nothing else: the request's admission slot and memory hold, the timeout
and the client's disconnect while the engine runs, and one log line and the metrics per
request. The form is read by :mod:`server.api.forms`, a diarized request's extra inputs are
opened by :mod:`server.api.diarization_inputs`, a streamed answer is :mod:`server.api.streaming`,
and how a result is rendered is its format's spec (:mod:`server.api.formats`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import ExitStack

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.admission import Admission
from server.api.diarization_inputs import diarization_inputs
from server.api.formats import RenderOptions
from server.api.forms import form_memory, read_form
from server.api.protocol import Task, TranscriptionRequest, parse_form
from server.api.streaming import stream_response
from server.api.work import Work
from server.audio.decode import AudioStream
from server.audio.decoders import DecoderPool, DecoderStream
from server.audio.pieces import AudioSource
from server.chinese import convert_transcript
from server.config import Settings
from server.diarization import DiarizationOptions
from server.engine.core import Engine
from server.errors import APIError, RequestTimeoutError
from server.metrics import Metrics
from server.request import Job
from server.transcript import Transcript

logger = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is there


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
        """Transcribe (or translate) the audio a request's form carries.

        Args:
            request: The HTTP request; its body is the multipart form.
            task: ``transcribe`` or ``translate`` (from the route).

        Returns:
            The rendered transcript, or, with ``stream=true``, its server-sent events.

        Raises:
            APIError: every failure, as the client should see it (a bad field, an unknown
                model, no room in the queue or in memory, a timeout, ...).
        """
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
                per_region=settings.language_detection == "region",
                languages=settings.languages,
            )
            started = time.perf_counter()
            if req.stream:
                return await stream_response(
                    engine,
                    job,
                    req,
                    scope.pop_all(),
                    on_end=lambda work: self._report(job, req, started, work),
                )
            work = Work.start(
                engine.executor,
                lambda cancelled: engine.run(job, cancelled=cancelled),
                scope.pop_all(),
            )
        try:
            transcript = await self._wait(work, request)
        except APIError as exc:
            self._finished(job, req, started, None, exc)
            raise
        self._finished(job, req, started, transcript, None)
        return _response(convert_transcript(transcript, job.chinese), req)

    def _open(
        self, req: TranscriptionRequest, scope: ExitStack
    ) -> tuple[AudioStream | DecoderStream, DiarizationOptions | None, tuple[AudioSource, ...]]:
        """Open the upload's audio (in a decoder process) and, diarized, its options and
        channels (blocking). Each handle is put in ``scope`` here, in the thread that opens
        it, so that none is lost when the request is cancelled while this runs.

        Raises:
            AudioError: the upload is not audio the server can decode.
            DiarizationUnavailableError: diarized, and the speaker encoder is not installed.
            InvalidRequestError: diarized, and its reference clips or channels are refused.
        """
        max_duration = self.settings.max_audio_duration
        audio = self.decoders.open(req.file, max_duration=max_duration)
        scope.callback(audio.close)
        if not req.diarize:
            return audio, None, ()
        self.engine.speaker_encoder()  # a 400 now, before anything is decoded, if missing
        diarization, channels = diarization_inputs(
            req, audio, self.decoders, max_duration=max_duration, scope=scope
        )
        return audio, diarization, channels

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

    def _report(
        self, job: Job, req: TranscriptionRequest, started: float, work: Work[Transcript]
    ) -> None:
        """:meth:`_finished` for work that has ended: with its transcript or its error."""
        error = work.exception()
        if error is None:
            self._finished(job, req, started, work.result(), None)
        elif isinstance(error, APIError):
            self._finished(job, req, started, None, error)

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


def _response(transcript: Transcript, req: TranscriptionRequest) -> Response:
    """The finished transcript in the request's format, with ``X-Whisper-Degraded`` naming
    what was given up."""
    granularities = req.granularities
    if any(kind == "word_timestamps" for kind, _ in transcript.degradations):
        # Words were dropped to fit memory: the segments carry the timing instead.
        granularities = granularities | {"segment"}
    body, media_type = req.spec.render(transcript, RenderOptions(granularities, req.logprobs))
    headers = {}
    if transcript.degradations:
        headers["X-Whisper-Degraded"] = ",".join(kind for kind, _ in transcript.degradations)
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return Response(body, media_type=media_type, headers=headers)
