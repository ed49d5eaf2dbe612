"""A live session's input audio, from appends to items.

An append is bounded by its size and its memory reserved first
(:class:`~server.realtime.buffers.SessionMemory`), then decoded to 16 kHz off the event loop
(:class:`~server.realtime.audio.InputDecoder`) and taken into the buffer a slice at a time. The
buffer is cut into items (utterances) by server VAD (Silero, scored frame by frame as the audio
arrives, its turns decided by :class:`~server.realtime.turns.TurnDetector`) or at the client's
commits. A committed item waits in :attr:`InputAudio.finals`, its audio still counted as held,
until the transcriber (:mod:`server.realtime.transcriber`) has decoded it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from server.config import Settings
from server.engine.core import Engine
from server.metrics import Metrics
from server.realtime.audio import InputDecoder, Piece, base64_size
from server.realtime.buffers import AudioBuffer, SessionMemory
from server.realtime.events import BufferAppend, EventError
from server.realtime.server_events import (
    BufferCommitted,
    ServerEvent,
    SpeechStarted,
    SpeechStopped,
    new_id,
)
from server.realtime.session_config import SessionConfig
from server.realtime.turns import StablePrefix, TurnDetector
from server.transcript import Transcript
from server.whisper.runner import SAMPLE_RATE, VAD_FRAME, StreamingVad

#: OpenAI refuses to commit less than this.
MIN_COMMIT_SAMPLES = SAMPLE_RATE // 10
#: Silence kept at the end of an item the VAD ended: enough for Whisper to hear the last word
#: out (faster-whisper's VAD pads speech by far more), short enough that the final decode starts
#: well before silence_duration_ms (500 ms by default) has passed.
TAIL_MS = 250


@dataclass(eq=False)
class Item:
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


class InputAudio:
    """The session's audio not yet transcribed, and the items it is cut into.

    Args:
        engine: The engine whose ledger the session's host RAM is counted in.
        settings: The server's (item and backlog limits).
        metrics: The app's (``whisper_realtime_audio_seconds_total``).
        owner: The session's id.
        api_key: The id of the session's API key.
        send: Sends a server event to the client (speech started and stopped, committed).

    Attributes:
        buffer: The audio not yet committed or dropped.
        pending: The item in progress, if any.
        finals: The committed items, in commit order, until their final decode is done.
        wake: Set when the transcriber may have work: an item committed, an early decode due.
        memory: The session's host RAM (the route holds it open for the session's life).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        *,
        owner: str,
        api_key: str | None,
        send: Callable[[ServerEvent], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._send = send
        self.buffer = AudioBuffer()
        self.pending: Item | None = None
        self.finals: deque[Item] = deque()
        self.wake = asyncio.Event()
        self.memory = SessionMemory(engine, settings, owner, self.held, api_key)
        self.seconds = 0.0  # audio taken in
        self.items = 0  # items committed
        self._decoder = InputDecoder("pcm16")
        self._vad: StreamingVad | None = None
        self._turns: TurnDetector | None = None
        self._vad_origin = 0  # session sample where the VAD started listening
        self._last_item: str | None = None
        self._max_item = int(settings.realtime_max_item_seconds * SAMPLE_RATE)

    def held(self) -> int:
        """Samples held not yet transcribed: the buffer and the committed items."""
        return len(self.buffer) + sum(len(i.samples) for i in self.finals if i.samples is not None)

    @property
    def quiet(self) -> bool:
        """Whether server VAD hears a silence that may end the turn in progress."""
        return self._turns is not None and self._turns.quiet_since is not None

    def configure(self, config: SessionConfig) -> None:
        """Take the audio as ``config`` says: its format, and server VAD when turned on."""
        if self._decoder.format != config.format:
            self._decoder = InputDecoder(config.format)
        if config.turn_detection is None:
            self._turns = None
            return
        if self._turns is None or self._vad is None:
            self._vad = StreamingVad()
            self._turns = TurnDetector(config.turn_detection)
            # The VAD hears from here on: count its frames from the current sample.
            self._vad_origin = self.buffer.end
            if self.pending is not None:
                # Speech the client was feeding by hand goes on as detected speech.
                self._turns.speaking = True
        else:
            self._turns.settings = config.turn_detection

    # ---- the client's events ------------------------------------------------------------------

    async def append(self, event: BufferAppend) -> None:
        """Bound the append by its size, reserve its memory, then decode it off the event loop
        (base64, resampling and the VAD) and take it in, slice by slice.

        Raises:
            EventError: the item or the backlog would grow past its limit, or the audio is
                not base64 (nothing of it is kept).
            InsufficientMemoryError: the host budget cannot hold it now.
        """
        adds = self._decoder.samples_for(base64_size(event.audio))
        if self._turns is None and len(self.buffer) + adds > self._max_item:
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
                pieces = await asyncio.to_thread(self._decoder.decode_base64, event.audio, vad)
            except ValueError as exc:
                raise EventError(
                    "'audio' is not valid base64; send the audio bytes base64-encoded.",
                    event_id=event.event_id,
                    param="audio",
                    code="invalid_value",
                ) from exc
            for piece in pieces:
                await self._take(piece)

    async def commit(self, event_id: str | None) -> None:
        """The client's commit: the item in progress, or whatever the buffer holds.

        Raises:
            EventError: less than 100 ms of audio to commit.
        """
        start = self.pending.start if self.pending is not None else self.buffer.start
        held = self.buffer.end - start
        if held < MIN_COMMIT_SAMPLES:
            raise EventError(
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {held * 1000 / SAMPLE_RATE:.2f}ms of audio.",
                event_id=event_id,
                code="input_audio_buffer_commit_empty",
            )
        if self.pending is None:
            self.pending = Item(new_id("item"), start, time.monotonic())
        if self._turns is not None:
            self._turns.reset()
        await self._commit_pending(self.buffer.end)

    def clear(self) -> None:
        """The client's clear: drop the item in progress and the buffer (committed items
        are still transcribed)."""
        if self.pending is not None:
            self.pending.dropped = True
            self.pending = None
        if self._turns is not None:
            self._turns.reset()
        self.buffer.clear()
        self.memory.settle()

    def release(self, item: Item) -> None:
        """The final decode of ``item``, the first committed, is done: its audio is no longer
        held."""
        assert self.finals[0] is item
        self.finals.popleft()
        self.memory.settle()

    # ---- cutting items ------------------------------------------------------------------------

    async def _take(self, piece: Piece) -> None:
        samples = piece.samples
        self.seconds += len(samples) / SAMPLE_RATE
        self.metrics.realtime_audio_seconds.inc(len(samples) / SAMPLE_RATE)
        self.buffer.append(samples)
        if self._turns is None:
            if self.pending is None and len(samples):
                self.pending = Item(new_id("item"), self.buffer.start, time.monotonic())
        else:
            assert piece.probabilities is not None
            await self._detect(piece.probabilities)

    async def _detect(self, probabilities: np.ndarray) -> None:
        """Send and act on the turns the VAD's latest frames complete."""
        assert self._turns is not None
        for turn in self._turns.feed(probabilities):
            at = turn.sample + self._vad_origin
            if turn.kind == "started":
                item = Item(new_id("item"), max(at, self.buffer.start), time.monotonic())
                self.pending = item
                await self._send(SpeechStarted(audio_start_ms=_ms(item.start), item_id=item.id))
            elif self.pending is not None:
                await self._send(SpeechStopped(audio_end_ms=_ms(at), item_id=self.pending.id))
                assert turn.speech_end is not None
                await self._commit_pending(at, speech_end=turn.speech_end + self._vad_origin)
        pending = self.pending
        if pending is not None and self.buffer.end - pending.start >= self._max_item:
            # Past the longest item: commit it at that length and go on in a new item (an
            # append is taken in slices of 1 s at most, so one cut is enough).
            at = pending.start + self._max_item
            await self._send(SpeechStopped(audio_end_ms=_ms(at), item_id=pending.id))
            await self._commit_pending(at)
            item = Item(new_id("item"), at, time.monotonic())
            self.pending = item
            await self._send(SpeechStarted(audio_start_ms=_ms(at), item_id=item.id))
        elif pending is None:
            # Silence: keep only what a start of speech would reach back to.
            keep = self._turns.prefix_samples + 2 * VAD_FRAME
            self.buffer.drop_before(self.buffer.end - keep)
        quiet = self._turns.quiet_since
        if pending is not None and pending is self.pending and quiet is not None:
            end = quiet + self._vad_origin + self._tail
            if self.buffer.end >= end and pending.early_end != end:
                pending.early_end = end  # the speech may be over: decode it now
                self.wake.set()

    @property
    def _tail(self) -> int:
        """TAIL_MS in samples, or less when the turn ends after a shorter silence."""
        silence = self._turns.settings.silence_duration_ms if self._turns else TAIL_MS
        return min(TAIL_MS, silence) * SAMPLE_RATE // 1000

    async def _commit_pending(self, end: int, *, speech_end: int | None = None) -> None:
        """Commit the item in progress up to session sample ``end`` and queue its final
        decode. When the VAD ended it, the item keeps TAIL_MS of the silence after
        ``speech_end``, not all of silence_duration_ms."""
        item = self.pending
        assert item is not None
        self.pending = None
        item.end = end if speech_end is None else min(end, speech_end + self._tail)
        item.samples = self.buffer.slice(item.start, item.end)
        item.previous_id = self._last_item
        item.stopped_at = time.monotonic()
        self.buffer.drop_before(end)
        self._last_item = item.id
        self.items += 1
        await self._send(BufferCommitted(item_id=item.id, previous_item_id=item.previous_id))
        self.finals.append(item)
        self.wake.set()


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE


__all__ = ["MIN_COMMIT_SAMPLES", "TAIL_MS", "InputAudio", "Item"]
