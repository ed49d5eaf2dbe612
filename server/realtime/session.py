"""Live transcription sessions (OpenAI's Realtime API, ``intent=transcription``).

One session is one WebSocket. The client appends audio; the session bounds each append by its
size and reserves its memory (:mod:`server.realtime.buffers`), decodes it to 16 kHz off the
event loop (:mod:`server.realtime.audio`), cuts it into items (utterances) with server VAD
(Silero, scored frame by frame as the audio arrives; :mod:`server.realtime.turns`) or at the
client's commits, and transcribes each item
through the engine: a :class:`~server.request.Job` per decode, run by :meth:`Engine.run` like any
request, so the memory planner plans and reserves each decode and the engine's slots and
scheduler bound the work.

Deltas while speaking: the item in progress is decoded again each time
``WHISPER_REALTIME_DELTA_INTERVAL`` seconds of new audio have arrived (one decode per session at
a time, and at most half of the session's time spent on them, so they cannot delay the final
decode for long). A delta sends only text two consecutive decodes agree on
(:class:`StablePrefix`), so later audio rarely contradicts it. When the item is committed it
is decoded once more: if that text extends what was sent, the rest goes as a last delta and the
deltas add up to ``completed.transcript`` exactly; if not, ``completed.transcript`` (the final
decode) is the text to keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server.admission import Admission
from server.api.formats import logprobs_body, usage_seconds
from server.chinese import convert_transcript
from server.config import Settings
from server.engine.core import Engine
from server.engine.store import ModelSource
from server.errors import (
    APIError,
    InsufficientMemoryError,
    InvalidRequestError,
    RateLimitError,
    ServerError,
)
from server.languages import parse_language
from server.metrics import Metrics
from server.realtime.audio import InputDecoder, Piece, base64_size
from server.realtime.buffers import AudioBuffer, SessionMemory
from server.realtime.events import (
    BufferAppend,
    BufferClear,
    BufferCommit,
    Dialect,
    EventError,
    SessionConfig,
    SessionUpdate,
    apply_beta,
    apply_ga,
    error_event,
    new_id,
    parse_client_event,
    server_event,
    session_body,
)
from server.realtime.turns import StablePrefix, Turn, TurnDetector, logprobs_within
from server.request import Job, hotwords_of
from server.transcript import Transcript
from server.whisper.runner import SAMPLE_RATE, VAD_FRAME, StreamingVad

logger = logging.getLogger(__name__)

#: OpenAI refuses to commit less than this.
MIN_COMMIT_SAMPLES = SAMPLE_RATE // 10
#: WebSocket close codes: policy violation (auth, bad intent) and "try again later" (limits).
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013
#: The codes of appends refused for the server's bounds, not for what they hold: such audio
#: still shows the client is there (other events answered with an error do not).
_AUDIO_REFUSED = {"input_audio_buffer_full", "input_audio_backlog_full", "insufficient_memory"}


# ---- items ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    """An utterance: in progress (speech heard, not committed) or committed."""

    id: str
    start: int  # session sample
    heard_at: float  # monotonic time speech started (or the first audio of a manual item)
    prefix: StablePrefix = field(default_factory=StablePrefix)
    decoded_to: int = 0  # session sample the last interim decode reached
    first_delta: bool = False
    dropped: bool = False
    #: The end (session sample) asked of an early final decode, and its result once done: the
    #: decode starts when the silence that may end the turn is TAIL long, while the VAD still
    #: waits out silence_duration_ms; the turn then ends at the same sample, so it is the final.
    early_end: int | None = None
    early: tuple[int, Transcript] | None = None
    # Set at commit:
    samples: np.ndarray | None = None
    end: int = 0
    previous_id: str | None = None
    stopped_at: float = 0.0


#: Silence kept at the end of an item the VAD ended: enough for Whisper to hear the last word
#: out (faster-whisper's VAD pads speech by far more), short enough that the final decode starts
#: well before silence_duration_ms (500 ms by default) has passed.
TAIL_MS = 250


# ---- sessions ----------------------------------------------------------------------------------


class LiveSessions:
    """The count of open sessions and its limit (``WHISPER_REALTIME_MAX_SESSIONS``)."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.active = 0
        self._lock = threading.Lock()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one session's place for the block.

        Raises:
            RateLimitError: the limit is reached (or the endpoint is off).
        """
        with self._lock:
            if self.active >= self.limit:
                what = (
                    "Live transcription is off on this server (WHISPER_REALTIME_MAX_SESSIONS=0)."
                    if self.limit == 0
                    else f"The server is at its limit of {self.limit} live sessions "
                    "(WHISPER_REALTIME_MAX_SESSIONS); retry later."
                )
                raise RateLimitError(what, retry_after=5.0, code="session_limit_reached")
            self.active += 1
        self.metrics.realtime_sessions.inc()
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1
            self.metrics.realtime_sessions.dec()


class RealtimeSession:
    """One live transcription session on an accepted WebSocket.

    Args:
        ws: The accepted WebSocket.
        engine, settings, metrics: The app's.
        dialect: ``ga`` or ``beta``: how ``*.created`` is sent. Each update is answered in the
            dialect it came in.
        model: The ``model`` query parameter, if any.
        api_key: The id of the API key the session was opened with (its decodes are shown to
            that key in GET /v1/memory).
    """

    def __init__(
        self,
        ws: WebSocket,
        *,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        dialect: Dialect,
        model: str | None,
        api_key: str | None = None,
    ) -> None:
        self.ws = ws
        self.api_key = api_key
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.dialect = dialect
        self.id = new_id("sess")
        self.config = SessionConfig(model=model)
        self.source: ModelSource | None = None
        self._input = InputDecoder(self.config.format)
        self._buffer = AudioBuffer()
        self._vad: StreamingVad | None = None
        self._turns: TurnDetector | None = None
        self._vad_origin = 0  # session sample where the VAD started listening
        self._pending: _Item | None = None
        self._finals: deque[_Item] = deque()
        self._last_item: str | None = None
        self._wake = asyncio.Event()
        self._cancelled = threading.Event()
        self._inflight: Future[Transcript] | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._interim_until = 0.0  # monotonic time before which no interim decode starts
        self._max_item = int(settings.realtime_max_item_seconds * SAMPLE_RATE)
        self._audio_s = 0.0
        self._items = 0
        #: The session's host RAM; the route holds it open for the session's life.
        self.memory = SessionMemory(engine, settings, self.id, self._held, api_key)

    def _held(self) -> int:
        """Samples held not yet transcribed: the buffer and the committed items."""
        return len(self._buffer) + sum(
            len(i.samples) for i in self._finals if i.samples is not None
        )

    # ---- lifecycle --------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the session until the client leaves, the session expires or stays idle too
        long; everything it holds is released on the way out."""
        started = time.monotonic()
        self.source = self._resolve(self.config)
        self._check_memory()
        self._configure(self.config)
        await self._send(
            server_event(
                "session.created" if self.dialect == "ga" else "transcription_session.created",
                session=self._session_body(self.dialect),
            )
        )
        decoder = asyncio.create_task(self._decode_loop())
        outcome = "closed"
        try:
            outcome = await self._receive_loop(started)
        finally:
            self._closed = True
            self._cancelled.set()
            decoder.cancel()
            with contextlib.suppress(BaseException):
                await decoder
            if self._inflight is not None and not self._inflight.done():
                # The worker stops at its next window; hold the session's slot until it has.
                with contextlib.suppress(BaseException):
                    await asyncio.wrap_future(self._inflight)
            self._buffer.clear()
            self.metrics.realtime_sessions_total.labels(outcome).inc()
            logger.info(
                "realtime %s ended (%s): %d items, %.1f s of audio in %.1f s",
                self.id,
                outcome,
                self._items,
                self._audio_s,
                time.monotonic() - started,
            )

    async def _receive_loop(self, started: float) -> str:
        """Read client events until the session ends; returns why it ended. Only audio and
        events acted on keep the session from going idle: one answered with an error (not JSON,
        unknown, invalid) does not."""
        settings = self.settings
        deadline = started + settings.realtime_max_session_duration
        active = time.monotonic()
        while True:
            now = time.monotonic()
            left = min(deadline, active + settings.realtime_idle_timeout) - now
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=max(0.0, left))
            except TimeoutError:
                return await self._time_out(deadline)
            except (WebSocketDisconnect, RuntimeError):
                return "disconnected"
            if message["type"] == "websocket.disconnect":
                return "disconnected"
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                event = parse_client_event(data)
            except EventError as exc:
                await self._send(error_event(exc, exc.event_id))
                continue
            try:
                await self._handle(event)
                active = time.monotonic()
            except APIError as exc:
                await self._send(error_event(exc, getattr(exc, "event_id", None) or event.event_id))
                if exc.code in _AUDIO_REFUSED:
                    active = time.monotonic()  # audio the server could not take now
            except Exception:
                # A fault of ours: say so and close properly rather than drop the socket.
                logger.exception("realtime %s: %s failed", self.id, event.type)
                await self.close_with(
                    ServerError("The server failed on this event; it has been logged."), 1011
                )
                return "error"
            if self._closed:
                return "disconnected"

    async def _time_out(self, deadline: float) -> str:
        """Close the session that has run too long or stayed idle; returns which."""
        settings = self.settings
        if time.monotonic() >= deadline:
            minutes = settings.realtime_max_session_duration / 60
            await self.close_with(
                EventError(
                    f"The session hit its maximum duration of {minutes:g} minutes "
                    "(WHISPER_REALTIME_MAX_SESSION_DURATION); open a new one.",
                    code="session_expired",
                ),
                1000,
            )
            return "expired"
        await self.close_with(
            EventError(
                f"No valid event for {settings.realtime_idle_timeout:g} s "
                "(WHISPER_REALTIME_IDLE_TIMEOUT); the session was closed.",
                code="session_idle_timeout",
            ),
            1000,
        )
        return "idle"

    async def close_with(self, error: APIError, code: int) -> None:
        """Send ``error`` as an ``error`` event, then close the socket with ``code``."""
        await self._send(error_event(error))
        self._closed = True
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, error.message[:120])

    async def _send(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        text = json.dumps(event, ensure_ascii=False)
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except Exception:  # the client is gone: the receive loop sees it next
                logger.debug("realtime %s: send failed", self.id, exc_info=True)
                self._closed = True

    # ---- configuration ------------------------------------------------------------------------

    def _resolve(self, config: SessionConfig) -> ModelSource:
        """The model ``config`` names, and its language, prompt and keywords checked (under the
        limits of the HTTP endpoints).

        Raises:
            ModelNotReadyError, ModelNotFoundError, InvalidRequestError.
        """
        source = self.engine.resolve(config.model)
        parse_language(config.language)
        limit = self.settings.max_prompt_chars
        if config.prompt is not None and len(config.prompt) > limit:
            raise EventError(
                f"The prompt is {len(config.prompt)} characters long; the limit is {limit} "
                "(WHISPER_MAX_PROMPT_CHARS).",
                param="prompt",
                code="invalid_value",
            )
        try:
            hotwords_of(config.keywords, None, limit)
        except InvalidRequestError as exc:
            raise EventError(exc.message, param="keywords", code="invalid_value") from exc
        return source

    def _configure(self, config: SessionConfig) -> None:
        """Make ``config`` the session's: the input decoder, and the VAD when turned on."""
        old = self.config
        self.config = config
        if config.format != old.format or self._input.format != config.format:
            self._input = InputDecoder(config.format)
        if config.turn_detection is None:
            self._turns = None
            return
        if self._turns is None or self._vad is None:
            self._vad = StreamingVad()
            self._turns = TurnDetector(config.turn_detection)
            # The VAD hears from here on: count its frames from the current sample.
            self._vad_origin = self._buffer.end
            if self._pending is not None:
                # Speech the client was feeding by hand goes on as detected speech.
                self._turns.speaking = True
        else:
            self._turns.settings = config.turn_detection

    def _session_body(self, dialect: Dialect) -> dict[str, Any]:
        served = self.engine.served.id if self.engine.served is not None else "whisper-1"
        return session_body(self.config, dialect, session_id=self.id, served=served)

    # ---- client events ------------------------------------------------------------------------

    async def _handle(self, event: Any) -> None:
        if isinstance(event, SessionUpdate):
            config = apply_ga(self.config, event)
            await self._update(config, "ga", event.event_id)
        elif isinstance(event, BufferAppend):
            await self._append(event)
        elif isinstance(event, BufferCommit):
            await self._commit(event.event_id)
        elif isinstance(event, BufferClear):
            if self._pending is not None:
                self._pending.dropped = True
                self._pending = None
            if self._turns is not None:
                self._turns.reset()
            self._buffer.clear()
            self.memory.settle()
            await self._send(server_event("input_audio_buffer.cleared"))
        else:  # transcription_session.update
            config = apply_beta(self.config, event)
            await self._update(config, "beta", event.event_id)

    async def _update(self, config: SessionConfig, dialect: Dialect, event_id: str | None) -> None:
        try:
            source = self._resolve(config)
        except EventError as exc:
            exc.event_id = event_id
            exc.param = "session." + (exc.param or "")
            raise
        except APIError as exc:
            raise EventError(
                exc.message, event_id=event_id, param=exc.param, code=exc.code
            ) from exc
        self.source = source
        self._configure(config)
        kind = "session.updated" if dialect == "ga" else "transcription_session.updated"
        await self._send(server_event(kind, session=self._session_body(dialect)))

    async def _append(self, event: BufferAppend) -> None:
        """Bound the append by its size, reserve its memory, then decode it off the event loop
        (base64, resampling and the VAD) and take it in, slice by slice."""
        adds = self._input.samples_for(base64_size(event.audio))
        if self._turns is None and len(self._buffer) + adds > self._max_item:
            limit = self.settings.realtime_max_item_seconds
            raise EventError(
                f"The input audio buffer would exceed {limit:g} s "
                "(WHISPER_REALTIME_MAX_ITEM_SECONDS); commit it (or clear it) first. This "
                "audio was dropped.",
                event_id=event.event_id,
                param="audio",
                code="input_audio_buffer_full",
            )
        vad = self._vad if self._turns is not None else None
        with self.memory.append(adds=adds, frame_chars=len(event.audio), event_id=event.event_id):
            try:
                pieces = await asyncio.to_thread(self._input.decode_base64, event.audio, vad)
            except ValueError as exc:
                raise EventError(
                    "'audio' is not valid base64; send the audio bytes base64-encoded.",
                    event_id=event.event_id,
                    param="audio",
                    code="invalid_value",
                ) from exc
            for piece in pieces:
                await self._take(piece)
        self._maybe_interim()

    async def _take(self, piece: Piece) -> None:
        samples = piece.samples
        self._audio_s += len(samples) / SAMPLE_RATE
        self.metrics.realtime_audio_seconds.inc(len(samples) / SAMPLE_RATE)
        self._buffer.append(samples)
        if self._turns is None:
            if self._pending is None and len(samples):
                self._pending = _Item(new_id("item"), self._buffer.start, time.monotonic())
        else:
            assert piece.probabilities is not None
            await self._detect(piece.probabilities)

    async def _detect(self, probabilities: np.ndarray) -> None:
        """Send and act on the turns the VAD's latest frames complete."""
        assert self._turns is not None
        for turn in self._turns.feed(probabilities):
            at = turn.sample + self._vad_origin
            if turn.kind == "started":
                item = _Item(new_id("item"), max(at, self._buffer.start), time.monotonic())
                self._pending = item
                await self._send(
                    server_event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=_ms(item.start),
                        item_id=item.id,
                    )
                )
            elif self._pending is not None:
                await self._send(
                    server_event(
                        "input_audio_buffer.speech_stopped",
                        audio_end_ms=_ms(at),
                        item_id=self._pending.id,
                    )
                )
                assert turn.speech_end is not None
                await self._commit_pending(at, speech_end=turn.speech_end + self._vad_origin)
        pending = self._pending
        if pending is not None and self._buffer.end - pending.start >= self._max_item:
            # Past the longest item: commit it at that length and go on in a new item (an
            # append is taken in slices of 1 s at most, so one cut is enough).
            at = pending.start + self._max_item
            await self._send(
                server_event(
                    "input_audio_buffer.speech_stopped", audio_end_ms=_ms(at), item_id=pending.id
                )
            )
            await self._commit_pending(at)
            item = _Item(new_id("item"), at, time.monotonic())
            self._pending = item
            await self._send(
                server_event(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=_ms(at),
                    item_id=item.id,
                )
            )
        elif pending is None:
            # Silence: keep only what a start of speech would reach back to.
            keep = self._turns.prefix_samples + 2 * VAD_FRAME
            self._buffer.drop_before(self._buffer.end - keep)
        quiet = self._turns.quiet_since
        if pending is not None and pending is self._pending and quiet is not None:
            end = quiet + self._vad_origin + self._tail
            if self._buffer.end >= end and pending.early_end != end:
                pending.early_end = end  # the speech may be over: decode it now
                self._wake.set()

    async def _commit(self, event_id: str | None) -> None:
        """The client's commit: the item in progress, or whatever the buffer holds."""
        start = self._pending.start if self._pending is not None else self._buffer.start
        held = self._buffer.end - start
        if held < MIN_COMMIT_SAMPLES:
            raise EventError(
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {held * 1000 / SAMPLE_RATE:.2f}ms of audio.",
                event_id=event_id,
                code="input_audio_buffer_commit_empty",
            )
        if self._pending is None:
            self._pending = _Item(new_id("item"), start, time.monotonic())
        if self._turns is not None:
            self._turns.reset()
        await self._commit_pending(self._buffer.end)

    @property
    def _tail(self) -> int:
        """TAIL_MS in samples, or less when the turn ends after a shorter silence."""
        silence = self._turns.settings.silence_duration_ms if self._turns else TAIL_MS
        return min(TAIL_MS, silence) * SAMPLE_RATE // 1000

    async def _commit_pending(self, end: int, *, speech_end: int | None = None) -> None:
        """Commit the item in progress up to session sample ``end`` and queue its final
        decode. When the VAD ended it, the item keeps TAIL_MS of the silence after
        ``speech_end``, not all of silence_duration_ms."""
        item = self._pending
        assert item is not None
        self._pending = None
        item.end = end if speech_end is None else min(end, speech_end + self._tail)
        item.samples = self._buffer.slice(item.start, item.end)
        item.previous_id = self._last_item
        item.stopped_at = time.monotonic()
        self._buffer.drop_before(end)
        self._last_item = item.id
        self._items += 1
        await self._send(
            server_event(
                "input_audio_buffer.committed", item_id=item.id, previous_item_id=item.previous_id
            )
        )
        self._finals.append(item)
        self._wake.set()

    def _maybe_interim(self) -> None:
        pending = self._pending
        interval = self.settings.realtime_delta_interval
        if pending is None or interval <= 0:
            return
        new = self._buffer.end - max(pending.decoded_to, pending.start)
        if new >= interval * SAMPLE_RATE and time.monotonic() >= self._interim_until:
            self._wake.set()

    # ---- decoding -----------------------------------------------------------------------------

    async def _decode_loop(self) -> None:
        """Final decodes first, in commit order; then, if due, one interim decode."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._finals:
                # Held (and counted) until it is transcribed.
                await self._complete(self._finals[0])
                self._finals.popleft()
                self.memory.settle()
            pending = self._pending
            if (
                pending is not None
                and pending.early_end is not None
                and (pending.early is None or pending.early[0] != pending.early_end)
            ):
                await self._early(pending, pending.early_end)
                self._wake.set()  # its turn may have ended meanwhile
                continue
            if self._turns is not None and self._turns.quiet_since is not None:
                continue  # silence: the early final decode comes first, not another interim
            pending = self._pending
            interval = self.settings.realtime_delta_interval
            if pending is None or interval <= 0 or time.monotonic() < self._interim_until:
                continue
            end = self._buffer.end
            if end - max(pending.decoded_to, pending.start) < interval * SAMPLE_RATE:
                continue
            await self._interim(pending, end)
            self._maybe_interim()
            if self._finals:
                self._wake.set()

    async def _interim(self, item: _Item, end: int) -> None:
        samples = self._buffer.slice(item.start, end)
        item.decoded_to = end
        began = time.monotonic()
        try:
            transcript = await self._transcribe(samples, item.id)
        except APIError as exc:
            logger.info("realtime %s: interim decode of %s failed: %s", self.id, item.id, exc)
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

    async def _early(self, item: _Item, end: int) -> None:
        """The final decode of ``item`` as if its turn ended at ``end`` (see ``_Item.early``);
        wasted when the speaker goes on."""
        samples = self._buffer.slice(item.start, end)
        try:
            transcript = await self._transcribe(samples, item.id)
        except APIError as exc:
            logger.info("realtime %s: early decode of %s failed: %s", self.id, item.id, exc)
            return
        item.early = (end, transcript)

    async def _complete(self, item: _Item) -> None:
        assert item.samples is not None
        try:
            if item.early is not None and item.early[0] == item.end:
                transcript = item.early[1]  # decoded while the VAD waited out the silence
            else:
                transcript = await self._transcribe(item.samples, item.id)
        except APIError as exc:
            logger.warning("realtime %s: item %s failed: %s", self.id, item.id, exc.message)
            body = exc.body()["error"]
            await self._send(
                server_event(
                    "conversation.item.input_audio_transcription.failed",
                    item_id=item.id,
                    content_index=0,
                    error=body,
                )
            )
            return
        text = transcript.text
        delta = item.prefix.final(text)
        if delta:
            await self._send_delta(item, delta, transcript)
        fields: dict[str, Any] = {
            "item_id": item.id,
            "content_index": 0,
            "transcript": text,
            "usage": {
                "type": "duration",
                "seconds": usage_seconds(len(item.samples) / SAMPLE_RATE),
            },
        }
        if self.config.logprobs:
            fields["logprobs"] = logprobs_body(transcript.logprobs)
        await self._send(
            server_event("conversation.item.input_audio_transcription.completed", **fields)
        )
        latency = time.monotonic() - item.stopped_at
        self.metrics.realtime_completion_seconds.observe(latency)
        logger.debug(
            "realtime %s: %s completed %.1f s of audio %.3f s after it stopped",
            self.id,
            item.id,
            len(item.samples) / SAMPLE_RATE,
            latency,
        )

    async def _send_delta(self, item: _Item, delta: str, transcript: Transcript) -> None:
        """Send ``delta``, which ``transcript`` (an interim or the final decode) gave; with
        logprobs asked for, it carries the log-probabilities of its own tokens, as that decode
        scored them."""
        if not item.first_delta:
            item.first_delta = True
            self.metrics.realtime_first_delta_seconds.observe(time.monotonic() - item.heard_at)
        fields: dict[str, Any] = {}
        if self.config.logprobs:
            tokens = logprobs_within(transcript.logprobs, transcript.text, *item.prefix.span)
            fields["logprobs"] = logprobs_body(tokens)
        await self._send(
            server_event(
                "conversation.item.input_audio_transcription.delta",
                item_id=item.id,
                content_index=0,
                delta=delta,
                **fields,
            )
        )

    def _job(self, samples: np.ndarray, item_id: str, seconds: float | None = None) -> Job:
        """The request that decodes ``samples`` (or, for a check, ``seconds`` of audio) with the
        session's options."""
        config = self.config
        assert self.source is not None
        return Job.for_live(
            samples,
            request_id=f"{self.id}/{item_id}",
            api_key=self.api_key,
            source=self.source,
            language=config.language,
            prompt=config.prompt,
            keywords=config.keywords,
            logprobs=config.logprobs,
            beam_size=self.settings.realtime_beam_size,
            max_prompt_chars=self.settings.max_prompt_chars,
            chinese_script=self.settings.chinese_script,
            seconds=seconds,
        )

    def _check_memory(self) -> None:
        """Refuse the session when it opens if the planner could not fit even the decode of
        its longest item (``WHISPER_REALTIME_MAX_ITEM_SECONDS``, one window at most) now, rather
        than fail its first item. Each decode is planned again when it runs.

        Raises:
            InsufficientMemoryError: with the planner's reason and when to retry.
        """
        seconds = min(self.settings.realtime_max_item_seconds, 30.0)
        job = self._job(np.zeros(0, np.float32), "check", seconds)
        plan = self.engine.check(job, seconds)
        if plan is None or plan.action != "reject":
            return
        retry = plan.retry_after or self.settings.retry_after
        raise InsufficientMemoryError(
            f"Not enough memory to transcribe a live session now ({plan.why or 'no memory'}); "
            f"try again in {retry:g} s.",
            retry_after=retry,
        )

    async def _transcribe(self, samples: np.ndarray, item_id: str) -> Transcript:
        """One decode of ``samples`` through the engine (planned and reserved like any request),
        in the engine's worker threads."""
        job = self._job(samples, item_id)
        future = self.engine.executor.submit(
            partial(self.engine.run, job, cancelled=self._cancelled)
        )
        self._inflight = future
        transcript = await asyncio.wrap_future(future)
        return convert_transcript(transcript, job.chinese)


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE


@contextmanager
def admitted(
    sessions: LiveSessions, admission: Admission, key: str | None, memory: SessionMemory
) -> Iterator[None]:
    """Everything a session holds while it is open: its place among the live sessions, a slot
    in the request queue (and the key's share of it), and its audio counted against host RAM
    (``memory``, the session's).

    Raises:
        RateLimitError: too many sessions, or the queue (or the key's share) is full.
    """
    with ExitStack() as stack:
        stack.enter_context(sessions.admit())
        stack.enter_context(admission.admit(key))
        stack.enter_context(memory)
        yield


__all__ = [
    "CLOSE_POLICY",
    "CLOSE_TRY_LATER",
    "LiveSessions",
    "RealtimeSession",
    "StablePrefix",
    "Turn",
    "TurnDetector",
    "admitted",
]
