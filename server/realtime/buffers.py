"""The audio a live session holds, and its account in host RAM.

A session holds 16 kHz float32 audio in two places: the buffer of audio not yet committed
(:class:`AudioBuffer`) and the committed items waiting for their final decode. A client can send
audio faster than the server transcribes it, so both are bounded: by seconds
(``WHISPER_REALTIME_MAX_BACKLOG_SECONDS``, the audio held not yet transcribed) and by bytes, in
the engine's reservation ledger under the host key, the budget that a file request's audio and
every decode are planned against (:class:`SessionMemory`). An append is measured from the length
of its base64 before a byte of it is decoded; one that would pass either bound is refused with an
``error`` event and nothing it carried is kept, while everything accepted before it is still
transcribed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import numpy as np

from server.config import Settings
from server.engine.core import Engine
from server.errors import InsufficientMemoryError
from server.memory import format_bytes
from server.memory.gate import HOST
from server.memory.reservations import Reservation
from server.realtime.events import EventError
from server.whisper.runner import SAMPLE_RATE

logger = logging.getLogger(__name__)

#: Bytes of one held sample (16 kHz float32).
SAMPLE_BYTES = 4
#: Working memory of one slice of an append as it is decoded, resampled and scored by the VAD
#: (about 1 s of audio in a few dtypes, with room to spare), whatever the append's size.
SLICE_WORK_BYTES = 1 << 20


class AudioBuffer:
    """The session's 16 kHz audio not yet committed or dropped, indexed by samples from the
    start of the session."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self.start = 0  # session sample of the first sample held
        self.end = 0  # session sample after the last one

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, samples: np.ndarray) -> None:
        if len(samples):
            self._chunks.append(samples)
            self.end += len(samples)

    def slice(self, a: int, b: int) -> np.ndarray:
        """Samples ``a`` to ``b`` (clipped to what is held), as a new array."""
        a, b = max(a, self.start), min(b, self.end)
        if b <= a:
            return np.zeros(0, np.float32)
        held = np.concatenate(list(self._chunks)) if len(self._chunks) != 1 else self._chunks[0]
        return np.array(held[a - self.start : b - self.start], dtype=np.float32)

    def drop_before(self, sample: int) -> None:
        """Forget everything before ``sample``."""
        sample = min(max(sample, self.start), self.end)
        while self._chunks and self.start + len(self._chunks[0]) <= sample:
            self.start += len(self._chunks.popleft())
        if self._chunks and sample > self.start:
            # A copy: a view would keep the whole chunk alive.
            self._chunks[0] = self._chunks[0][sample - self.start :].copy()
            self.start = sample

    def clear(self) -> None:
        self.drop_before(self.end)


class SessionMemory:
    """A live session's host RAM, reserved in the engine's ledger before it is allocated.

    While the session is open (this object entered) it holds two reservations under the host
    key: a fixed one for the copies its decodes make (two items' worth: an item cut out of the
    buffer, and the audio a decode is given), and one that follows the audio it holds, the
    buffer and the committed items not yet transcribed (:meth:`settle`). Each append also
    reserves, while it is decoded, its frame, its working memory and the audio it will add
    (:meth:`append`); what does not fit the host budget now is refused.

    Args:
        engine: The engine whose ledger and host budget are used.
        settings: The server's (item and backlog limits, the memory policy).
        owner: The session's id, shown in ``GET /v1/memory``.
        held: Samples the session holds now, not yet transcribed.
        api_key: The id of the API key the session came with (see Reservations.reserve).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        owner: str,
        held: Callable[[], int],
        api_key: str | None = None,
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.api_key = api_key  # whose reservations these are, in /v1/memory's per-key view
        self.max_backlog = int(settings.realtime_max_backlog_seconds * SAMPLE_RATE)
        self._enforce = settings.memory_policy != "off"
        self._held_now = held
        self._fixed_bytes = 2 * int(settings.realtime_max_item_seconds * SAMPLE_RATE) * SAMPLE_BYTES
        self._fixed: Reservation | None = None
        self._held: Reservation | None = None
        self._held_bytes = 0
        self._incoming = 0  # bytes of audio that appends in progress will add

    def __enter__(self) -> SessionMemory:
        # Counted, not refused: the session's check when it opens refuses it when the planner
        # cannot fit a decode of its longest item, which needs more.
        self._fixed = self.engine.reservations.reserve(
            HOST, self._fixed_bytes, self.owner, api_key=self.api_key
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for reservation in (self._fixed, self._held):
            if reservation is not None:
                reservation.release()
        self._fixed = self._held = None
        self._held_bytes = 0

    @contextmanager
    def append(self, *, adds: int, frame_chars: int, event_id: str | None) -> Iterator[None]:
        """Reserve what decoding one append takes, for the block; the audio it added is counted
        as held when the block ends.

        Args:
            adds: The samples the append adds (known from its size, before decoding).
            frame_chars: The length of the append's base64, held twice while it is decoded (the
                frame as received, and the ``audio`` parsed out of it).
            event_id: The append's ``event_id``, for the error.

        Raises:
            EventError: ``input_audio_backlog_full``: the session would hold more than
                ``WHISPER_REALTIME_MAX_BACKLOG_SECONDS`` of audio not yet transcribed.
            InsufficientMemoryError: the host budget cannot hold it now.
        """
        held = self._held_now()
        if held + adds > self.max_backlog:
            raise EventError(
                f"The session holds {held / SAMPLE_RATE:.1f} s of audio not yet transcribed; "
                f"this append ({adds / SAMPLE_RATE:.1f} s) would take it past "
                f"{self.max_backlog / SAMPLE_RATE:g} s (WHISPER_REALTIME_MAX_BACKLOG_SECONDS). "
                "This audio was dropped; wait for the items committed to complete, or send "
                "audio no faster than it plays.",
                event_id=event_id,
                param="audio",
                code="input_audio_backlog_full",
            )
        working = 2 * frame_chars + SLICE_WORK_BYTES
        audio = adds * SAMPLE_BYTES
        ledger = self.engine.reservations
        with ledger.planning():
            if self._enforce:
                budget = self.engine.free_budget("cpu")  # host RAM, whatever serves the decodes
                if working + audio > budget.amount:
                    raise InsufficientMemoryError(
                        f"Not enough memory to decode this append now: it needs "
                        f"{format_bytes(working + audio)} and the budget has {budget.why}. "
                        "This audio was dropped; send smaller appends, or retry once the items "
                        "committed have completed."
                    )
            work = ledger.reserve(HOST, working, f"{self.owner}/append", api_key=self.api_key)
            self._incoming += audio
            self.settle()
        try:
            yield
        finally:
            self._incoming -= audio
            work.release()
            self.settle()

    def settle(self) -> None:
        """Count the audio the session holds now, and what appends in progress will add.

        Growing here is counted, never refused: :meth:`append` refused what did not fit.
        """
        nbytes = self._held_now() * SAMPLE_BYTES + self._incoming
        if nbytes == self._held_bytes or self._fixed is None:
            return
        ledger = self.engine.reservations
        with ledger.planning():
            old = self._held
            self._held = (
                ledger.reserve(HOST, nbytes, f"{self.owner}/audio", api_key=self.api_key)
                if nbytes
                else None
            )
            self._held_bytes = nbytes
            if old is not None:
                old.release()


__all__ = ["SAMPLE_BYTES", "AudioBuffer", "SessionMemory"]
