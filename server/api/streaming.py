"""``stream=true``: a transcription answered as server-sent events while the engine decodes.

The response starts once the first piece of audio has decoded, so that a failure before it (an
upload that is not audio, no memory) is still an ordinary error response with its status; after
it, a failure is an ``error`` event. Which events a segment becomes is its response format's
(:meth:`server.api.formats.FormatSpec.segment_events`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.formats import sse
from server.api.protocol import TranscriptionRequest
from server.api.work import Work
from server.chinese import convert_segment, convert_transcript, is_chinese
from server.engine.core import Engine
from server.errors import APIError
from server.request import Job
from server.transcript import Segment, Transcript

_KEEPALIVE_S = 10.0
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_response(
    engine: Engine,
    job: Job,
    req: TranscriptionRequest,
    scope: ExitStack,
    *,
    on_end: Callable[[Work[Transcript]], None],
) -> Response:
    """Start the engine on ``job`` and answer with its events once the first piece of audio
    has decoded.

    Args:
        engine: Runs the job in its executor.
        job: The request's job.
        req: The parsed request (its format decides the events).
        scope: What the request holds; the work owns it from here (:class:`Work`).
        on_end: Called on the event loop with the work once it has ended, whether or not
            anyone reads the stream then (the request's log line and metrics).

    Returns:
        The event stream. The work is cancelled once the response ends, however it ends.

    Raises:
        APIError: the work failed before the first piece decoded.
    """
    loop = asyncio.get_running_loop()
    # What the worker reports, in order: _DECODED, segments, then _ENDED once it has stopped
    # and released everything.
    events: asyncio.Queue[Segment | _Mark] = asyncio.Queue()

    def on_segment(segment: Segment, language: str | None) -> None:
        if is_chinese(job.task, segment.language or language):
            segment = convert_segment(segment, job.chinese)
        loop.call_soon_threadsafe(events.put_nowait, segment)

    def on_decoded() -> None:
        loop.call_soon_threadsafe(events.put_nowait, _DECODED)

    work = Work.start(
        engine.executor,
        lambda cancelled: engine.run(
            job, on_segment=on_segment, cancelled=cancelled, on_decoded=on_decoded
        ),
        scope,
    )
    work.add_done_callback(lambda: events.put_nowait(_ENDED))
    work.add_done_callback(lambda: on_end(work))
    try:
        first = await events.get()
        if first is _ENDED and (error := work.exception()) is not None:
            raise error
    except BaseException:
        work.cancel()
        raise
    return _EventStream(
        _events(job, req, work, events, first),
        work,
        media_type="text/event-stream",
        headers=dict(_HEADERS),
    )


async def _events(
    job: Job,
    req: TranscriptionRequest,
    work: Work[Transcript],
    events: asyncio.Queue[Segment | _Mark],
    first: Segment | _Mark,
) -> AsyncIterator[bytes]:
    """The body: each segment's events as it comes, keep-alive comments while none does, and
    ``transcript.text.done`` (or an ``error`` event) once the work has ended."""
    spec = req.spec
    try:
        item = first
        while item is not _ENDED:
            if item is _KEEPALIVE:
                yield b": keep-alive\n\n"
            elif isinstance(item, Segment):
                yield spec.segment_events(item, logprobs=req.logprobs)
            item = await _next_event(events)
        try:
            transcript = work.result()
        except APIError as exc:
            yield sse({"type": "error", **exc.body()})
            return
        yield spec.done_event(convert_transcript(transcript, job.chinese), logprobs=req.logprobs)
    finally:
        work.cancel()  # the client went: the work stops and releases what it holds


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
