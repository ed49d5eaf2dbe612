"""The serving layer behind the audio routes: form -> decoded audio -> engine -> rendered
response, with admission, timeouts, client disconnects and streaming."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.audio import DecodedAudio, decode_audio
from server.config import Settings
from server.engine import Engine, Job
from server.errors import APIError, InvalidRequestError, ModelNotReadyError, RequestTimeoutError
from server.formats import render, sse, text_delta_event, text_done_event
from server.protocol import Task, TranscriptionRequest, parse_form
from server.transcript import Segment, Transcript

logger = logging.getLogger(__name__)
_KEEPALIVE_S = 10.0
_MAX_FIELDS = 64


class _Upload:
    """A file part read into memory (the form's spooled file is closed right after)."""

    def __init__(self, filename: str | None, data: bytes) -> None:
        self.filename = filename
        self.data = data


async def read_form(request: Request, settings: Settings) -> dict[str, list[Any]]:
    """Read the multipart form into ``name -> [values]``, files as :class:`_Upload`."""
    part_limit = max(1 << 20, settings.max_prompt_chars * 4 + 1024)
    async with request.form(max_files=4, max_fields=_MAX_FIELDS, max_part_size=part_limit) as form:
        fields: dict[str, list[Any]] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                fields.setdefault(name, []).append(_Upload(value.filename, await value.read()))
            else:
                fields.setdefault(name, []).append(value)
        return fields


def _vad_parameters(req: TranscriptionRequest) -> dict[str, Any] | None:
    strategy = req.chunking_strategy
    if strategy is None or strategy.type != "server_vad":
        return None
    params: dict[str, Any] = {}
    if strategy.threshold is not None:
        params["threshold"] = strategy.threshold
    if strategy.silence_duration_ms is not None:
        params["min_silence_duration_ms"] = strategy.silence_duration_ms
    if strategy.prefix_padding_ms is not None:
        params["speech_pad_ms"] = strategy.prefix_padding_ms
    return params or None


class TranscriptionService:
    """Serves ``/v1/audio/transcriptions`` and ``/v1/audio/translations``."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    async def handle(self, request: Request, task: Task) -> Response:
        settings = self.settings
        form = await read_form(request, settings)
        req = parse_form(
            form,
            task=task,
            max_beam_size=settings.max_beam_size,
            max_prompt_chars=settings.max_prompt_chars,
        )
        engine = self.engine
        if engine.served is None:
            raise ModelNotReadyError(
                f"The model is not loaded: {engine.load_error or 'still starting'}.",
                retry_after=settings.retry_after,
            )
        source = engine.store.resolve(req.model, engine.served)
        with engine.admit():
            audio: DecodedAudio = await anyio.to_thread.run_sync(
                partial(decode_audio, req.file, max_duration=settings.max_audio_duration)
            )
            job = Job(
                request_id=getattr(request.state, "request_id", "-"),
                audio=audio.samples,
                source=source,
                task=req.task,
                language=req.language,
                prompt=req.prompt,
                temperature=req.temperature,
                beam_size=req.beam_size or settings.default_beam_size,
                word_timestamps=req.word_timestamps,
                vad_filter=req.vad_filter or req.chunking_strategy is not None,
                vad_parameters=_vad_parameters(req),
                hotwords=req.hotwords,
            )
            if req.stream:
                return StreamingResponse(
                    self._stream(job, req, request),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            transcript = await self._run(job, request)
        return self._render(transcript, req)

    async def _run(self, job: Job, request: Request) -> Transcript:
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self.engine.executor, partial(self.engine.run, job, cancelled=cancelled)
        )
        watcher = asyncio.create_task(self._watch_disconnect(request, cancelled))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.request_timeout)
        except TimeoutError:
            cancelled.set()
            raise RequestTimeoutError(
                f"Transcription took longer than WHISPER_REQUEST_TIMEOUT="
                f"{self.settings.request_timeout:g}s; send a shorter file."
            ) from None
        finally:
            cancelled.set() if not future.done() else None
            watcher.cancel()

    @staticmethod
    async def _watch_disconnect(request: Request, cancelled: threading.Event) -> None:
        while not cancelled.is_set():
            if await request.is_disconnected():
                cancelled.set()
                return
            await asyncio.sleep(0.5)

    def _render(self, transcript: Transcript, req: TranscriptionRequest) -> Response:
        granularities = req.granularities
        if any(kind == "word_timestamps" for kind, _ in transcript.degradations):
            # Words were dropped to fit memory: the segments carry the timing instead.
            granularities = granularities | {"segment"}
        body, media_type = render(transcript, req.response_format, granularities=granularities)
        headers = {}
        if transcript.degradations:
            headers["X-Whisper-Degraded"] = ",".join(kind for kind, _ in transcript.degradations)
        if isinstance(body, dict):
            return JSONResponse(body, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    async def _stream(
        self, job: Job, req: TranscriptionRequest, request: Request
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Segment] = asyncio.Queue()
        cancelled = threading.Event()

        def on_segment(segment: Segment) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, segment)

        with self.engine.admit():
            future = loop.run_in_executor(
                self.engine.executor,
                partial(self.engine.run, job, on_segment=on_segment, cancelled=cancelled),
            )
            try:
                while True:
                    getter = asyncio.ensure_future(queue.get())
                    waiting: set[asyncio.Future[Any]] = {getter, future}
                    done, _ = await asyncio.wait(
                        waiting, timeout=_KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter in done:
                        yield sse(text_delta_event(getter.result().text))
                        continue
                    getter.cancel()
                    if future in done:
                        break
                    yield b": keep-alive\n\n"
                while not queue.empty():
                    yield sse(text_delta_event(queue.get_nowait().text))
                try:
                    transcript = future.result()
                except APIError as exc:
                    yield sse({"type": "error", **exc.body()})
                    return
                done_event: dict[str, Any] = text_done_event(transcript.text, transcript.duration)
                if transcript.degradations:
                    done_event["x_whisper_degraded"] = [
                        {"kind": k, "reason": r} for k, r in transcript.degradations
                    ]
                yield sse(done_event)
            finally:
                cancelled.set()


def bad_request(message: str, param: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)
