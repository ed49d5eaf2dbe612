"""A live session's items -> decodes -> deltas and ``completed``.

Each decode is a :class:`~server.request.Job` (:meth:`LiveDecoding.job`, the request factory)
run by :meth:`Engine.run` in the engine's worker threads like any request, so the memory planner
plans and reserves each decode and the engine's slots and scheduler bound the work. One decode
per session runs at a time: final decodes first, in commit order, then an early or an interim
decode of the item in progress.

Deltas while speaking: the item in progress is decoded again each time
``WHISPER_REALTIME_DELTA_INTERVAL`` seconds of new audio have arrived (at most half of the
session's time spent on them, so they cannot delay the final decode for long). A delta sends
only text two consecutive decodes agree on (:class:`~server.realtime.turns.StablePrefix`), so
later audio rarely contradicts it. When the item is committed it is decoded once more (or was
already, early, while the VAD waited out the silence that ended it): if that text extends what
was sent, the rest goes as a last delta and the deltas add up to ``completed.transcript``
exactly; if not, ``completed.transcript`` (the final decode) is the text to keep.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import numpy as np

from server.api.formats import languages_body, logprobs_body, usage_seconds
from server.batching.policy import LiveDecode
from server.chinese import convert_transcript
from server.config import Settings
from server.engine.core import Engine
from server.errors import APIError
from server.metrics import Metrics
from server.realtime.decoding import LiveDecoding
from server.realtime.input import InputAudio, Item
from server.realtime.server_events import (
    ServerEvent,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
    error_body,
)
from server.realtime.turns import logprobs_within
from server.transcript import Transcript
from server.whisper.runner import SAMPLE_RATE

logger = logging.getLogger(__name__)


class Transcriber:
    """Decodes a session's items through the engine and sends what they say.

    Args:
        engine: Runs the decodes.
        settings: The server's (the delta interval).
        metrics: The app's (first delta and completion latencies).
        audio: The session's input: its committed items and the item in progress.
        session_id: The session's id, in the log.
        send: Sends a server event to the client.

    Attributes:
        decoding: What the decodes run with; the session sets it when it opens and at each
            update (a decode running keeps the options it started with).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        audio: InputAudio,
        *,
        session_id: str,
        send: Callable[[ServerEvent], Awaitable[None]],
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.audio = audio
        self.session_id = session_id
        self.decoding: LiveDecoding | None = None
        self._send = send
        self._cancelled = threading.Event()
        self._inflight: Future[Transcript] | None = None
        self._interim_until = 0.0  # monotonic time before which no interim decode starts

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Decode in the background for the block.

        On every way out, a cancellation of the caller included, the decode loop is cancelled
        and the engine's work in flight told to stop (it stops at its next window), and both
        are waited for, so that they are over before the session's queue slot and memory are
        released. A cancellation of the caller that comes while waiting is raised once they
        are.
        """
        loop = asyncio.create_task(self._decode_loop())
        try:
            yield
        finally:
            self._cancelled.set()
            loop.cancel()
            interrupted = await _outlast(loop)
            if not loop.cancelled() and loop.exception() is not None:
                logger.error(
                    "realtime %s: the decode loop failed",
                    self.session_id,
                    exc_info=loop.exception(),
                )
            inflight = self._inflight  # read once the loop is done: it submits no more
            if inflight is not None and not inflight.done():
                interrupted = await _outlast(asyncio.wrap_future(inflight)) or interrupted
            if interrupted is not None:
                raise interrupted

    def wake_for_interim(self) -> None:
        """Wake the decode loop if the item in progress has enough new audio for an interim
        decode, and the session's share of time for them allows one now."""
        pending = self.audio.pending
        interval = self.settings.realtime_delta_interval
        if pending is None or interval <= 0:
            return
        new = self.audio.buffer.end - max(pending.decoded_to, pending.start)
        if new >= interval * SAMPLE_RATE and time.monotonic() >= self._interim_until:
            self.audio.wake.set()

    # ---- the decode loop ----------------------------------------------------------------------

    async def _decode_loop(self) -> None:
        """Final decodes first, in commit order; then an early decode, or, if due, one interim
        decode."""
        audio = self.audio
        while True:
            await audio.wake.wait()
            audio.wake.clear()
            while audio.finals:
                # Held (and counted) until it is transcribed.
                item = audio.finals[0]
                await self._complete(item)
                audio.release(item)
            pending = audio.pending
            if (
                pending is not None
                and pending.early_end is not None
                and (pending.early is None or pending.early[0] != pending.early_end)
            ):
                await self._early(pending, pending.early_end)
                audio.wake.set()  # its turn may have ended meanwhile
                continue
            if audio.quiet:
                continue  # silence: the early final decode comes first, not another interim
            interval = self.settings.realtime_delta_interval
            if pending is None or interval <= 0 or time.monotonic() < self._interim_until:
                continue
            end = audio.buffer.end
            if end - max(pending.decoded_to, pending.start) < interval * SAMPLE_RATE:
                continue
            await self._interim(pending, end)
            self.wake_for_interim()
            if audio.finals:
                audio.wake.set()

    async def _interim(self, item: Item, end: int) -> None:
        """Decode ``item`` up to ``end`` and send what the decode adds to its stable prefix."""
        samples = self.audio.buffer.slice(item.start, end)
        item.decoded_to = end
        began = time.monotonic()
        try:
            transcript = await self._transcribe(samples, item.id, "interim")
        except APIError as exc:
            logger.info(
                "realtime %s: interim decode of %s failed: %s", self.session_id, item.id, exc
            )
            return
        finally:
            # At most half of the session's time goes to interim decodes.
            now = time.monotonic()
            self._interim_until = now + (now - began)
        if item.dropped:
            return
        delta = item.prefix.interim(transcript.text)
        if delta:
            await self._send_delta(item, delta, transcript)

    async def _early(self, item: Item, end: int) -> None:
        """The final decode of ``item`` as if its turn ended at ``end`` (see ``Item.early``);
        wasted when the speaker goes on."""
        samples = self.audio.buffer.slice(item.start, end)
        try:
            transcript = await self._transcribe(samples, item.id)
        except APIError as exc:
            logger.info("realtime %s: early decode of %s failed: %s", self.session_id, item.id, exc)
            return
        item.early = (end, transcript)

    async def _complete(self, item: Item) -> None:
        """The final decode of committed ``item``: its last delta and ``completed``, or
        ``failed``."""
        assert item.samples is not None
        try:
            if item.early is not None and item.early[0] == item.end:
                transcript = item.early[1]  # decoded while the VAD waited out the silence
            else:
                transcript = await self._transcribe(item.samples, item.id)
        except APIError as exc:
            logger.warning("realtime %s: item %s failed: %s", self.session_id, item.id, exc.message)
            await self._send(TranscriptionFailed(item_id=item.id, error=error_body(exc)))
            return
        text = transcript.text
        delta = item.prefix.final(text)
        if delta:
            await self._send_delta(item, delta, transcript)
        seconds = len(item.samples) / SAMPLE_RATE
        await self._send(
            TranscriptionCompleted(
                item_id=item.id,
                transcript=text,
                usage={"type": "duration", "seconds": usage_seconds(seconds)},
                languages=languages_body(transcript.languages),
                logprobs=logprobs_body(transcript.logprobs) if self._logprobs else None,
            )
        )
        latency = time.monotonic() - item.stopped_at
        self.metrics.realtime_completion_seconds.observe(latency)
        logger.debug(
            "realtime %s: %s completed %.1f s of audio %.3f s after it stopped",
            self.session_id,
            item.id,
            seconds,
            latency,
        )

    async def _send_delta(self, item: Item, delta: str, transcript: Transcript) -> None:
        """Send ``delta``, which ``transcript`` (an interim or the final decode) gave; with
        logprobs asked for, it carries the log-probabilities of its own tokens, as that decode
        scored them."""
        if not item.first_delta:
            item.first_delta = True
            self.metrics.realtime_first_delta_seconds.observe(time.monotonic() - item.heard_at)
        logprobs = None
        if self._logprobs:
            tokens = logprobs_within(transcript.logprobs, transcript.text, *item.prefix.span)
            logprobs = logprobs_body(tokens)
        await self._send(TranscriptionDelta(item_id=item.id, delta=delta, logprobs=logprobs))

    @property
    def _logprobs(self) -> bool:
        return self.decoding is not None and self.decoding.config.logprobs

    async def _transcribe(
        self, samples: np.ndarray, item_id: str, decode: LiveDecode = "final"
    ) -> Transcript:
        """One decode of ``samples`` through the engine (planned and reserved like any request),
        in the engine's worker threads; ``decode`` is its kind (an early decode is a final)."""
        assert self.decoding is not None
        job = self.decoding.job(samples, item_id, decode=decode)
        future = self.engine.executor.submit(
            partial(self.engine.run, job, cancelled=self._cancelled)
        )
        self._inflight = future
        transcript = await asyncio.wrap_future(future)
        return convert_transcript(transcript, job.chinese)


async def _outlast(future: asyncio.Future[Any]) -> asyncio.CancelledError | None:
    """Wait until ``future`` is done, through any cancellation of the task waiting (Python
    3.10 has no TaskGroup to do it).

    Returns:
        That cancellation, if any, for the caller to raise once all it waits for is done.
    """
    interrupted: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError as exc:
            interrupted = exc
    if not future.cancelled():
        future.exception()  # marked retrieved: the caller reports what it has to
    return interrupted


__all__ = ["Transcriber"]
