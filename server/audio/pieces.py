"""Cutting long audio into pieces at pauses: all at once (:func:`split_on_silence`) or while it
is decoded, one piece at a time (:class:`PieceReader`), so that host memory holds one piece and
a tail however long the audio."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.audio.decode import SAMPLE_RATE
from server.whisper.runner import speech_timestamps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioSpan:
    """A stretch of samples ``[start, end)``.

    Attributes:
        start: Index of the first sample.
        end: Index one past the last sample.
        sample_rate: Samples per second, for the times in seconds.
    """

    start: int
    end: int
    sample_rate: int = SAMPLE_RATE

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end / self.sample_rate

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / self.sample_rate


# Where to look for a cut: the last third of a span, at most this long. Speech pauses every few
# seconds, and the VAD runs only here (plus a second either side): for two hours of speech on
# two CPU cores, about 0.5 s with 10-minute spans and 6.5 s with 30-second ones, against 17 s
# for the whole file.
_SEARCH_FRACTION = 1 / 3
_SEARCH_MAX_S = 20.0
# Audio on either side of the search window that the VAD hears too, to settle its state.
_VAD_CONTEXT_S = 1.0
_VAD_OPTIONS = {"min_silence_duration_ms": 100, "speech_pad_ms": 0, "min_speech_duration_ms": 0}
_ENERGY_WINDOW_S = 0.1
_ENERGY_HOP_S = 0.01
# Pauses whose quietest 100 ms is within this much of the quietest pause in the window count as
# equally quiet, and the longest of them wins. A break between sentences is usually both longer
# and quieter (no breath, no tail of the last word) than a pause inside one.
_PAUSE_LEVEL_TOLERANCE_DB = 6.0


def split_on_silence(
    samples: np.ndarray, *, max_span_s: float, sample_rate: int = SAMPLE_RATE
) -> list[AudioSpan]:
    """Cut audio into contiguous spans no longer than ``max_span_s``, at pauses where possible.

    The spans tile the audio exactly (the first starts at 0, each starts where the one before
    ends, the last ends at ``len(samples)``), so a time inside a span plus its ``start_s`` is a
    time in the file. Each cut lies in the last third (at most 20 s) of the span it ends:
    in the middle of the quietest, then longest, pause between speech that the Silero VAD
    hears there; where it hears none, at the centre of the quietest 100 ms; where the search
    window is shorter than 100 ms, exactly at the limit. :class:`PieceReader` makes the same
    cuts while decoding, one piece at a time.

    Args:
        samples: Mono samples.
        max_span_s: Longest span, in seconds.
        sample_rate: Rate of ``samples``, in Hz. The VAD is used only at 16 kHz.

    Returns:
        The spans in order; one span if the audio is no longer than ``max_span_s``.

    Raises:
        ValueError: ``max_span_s`` is shorter than one sample.
    """
    reader = PieceReader(ArraySource(samples, sample_rate), sample_rate=sample_rate)
    spans = []
    while (piece := reader.next(max_span_s)) is not None:
        spans.append(AudioSpan(piece.start, piece.end, sample_rate))
    if not spans:
        return [AudioSpan(0, 0, sample_rate)]
    reader.log_cuts()
    return spans


class ArraySource:
    """Samples already in memory, read like an :class:`~server.audio.decode.AudioStream` (views, no copies)."""

    def __init__(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        self.samples = samples
        self.sample_rate = sample_rate
        self._pos = 0

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def decoded_seconds(self) -> float:
        return self._pos / self.sample_rate

    @property
    def finished(self) -> bool:
        return self._pos >= len(self.samples)

    def read(self, max_samples: int) -> np.ndarray:
        out = self.samples[self._pos : self._pos + max(0, max_samples)]
        self._pos += len(out)
        return out

    def close(self) -> None:
        pass


class AudioSource(Protocol):
    """Where a request's samples come from: decoded already (:class:`ArraySource`), decoded as
    they are read (:class:`~server.audio.decode.AudioStream`), or one channel of a call with the other side's
    echo muted (``server.diarization.channels.ChannelSource``)."""

    @property
    def duration(self) -> float | None: ...

    @property
    def decoded_seconds(self) -> float: ...

    @property
    def finished(self) -> bool: ...

    def read(self, max_samples: int) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True, eq=False)  # eq=False: an array has no single truth value
class Piece:
    """A stretch of a request's audio, held while it is transcribed.

    Attributes:
        start: Index of its first sample in the whole audio.
        samples: The samples.
        sample_rate: Samples per second.
        last: Whether the audio ends with it.
    """

    start: int
    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE
    last: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


class PieceReader:
    """Cuts audio into pieces at pauses while reading it, holding one piece at a time.

    Each call to :meth:`next` reads just enough to cut the next piece (its length, plus a
    second the VAD listens to past the limit), cuts it where :func:`split_on_silence` would,
    and keeps the rest for the piece after. So host memory holds one piece and a tail, however
    long the audio.

    Args:
        source: Where the samples come from.
        sample_rate: Their rate, in Hz; the VAD is used only at 16 kHz.
    """

    def __init__(self, source: AudioSource, *, sample_rate: int = SAMPLE_RATE) -> None:
        self.source = source
        self.sample_rate = sample_rate
        self._carry = np.empty(0, dtype=np.float32)
        self._start = 0
        self._cuts = {"pause": 0, "quiet": 0, "limit": 0}

    @property
    def position(self) -> int:
        """Samples handed out in pieces so far."""
        return self._start

    @property
    def finished(self) -> bool:
        """Whether every sample has been handed out."""
        return self.source.finished and not len(self._carry)

    def next(self, max_span_s: float, *, slack_s: float = 0.0) -> Piece | None:
        """The next piece, no longer than ``max_span_s``; None when the audio is used up.

        Args:
            max_span_s: Longest piece, in seconds.
            slack_s: When the audio ends within this much past ``max_span_s``, the piece runs
                to the end instead of leaving a sliver after it.

        Raises:
            ValueError: ``max_span_s`` is shorter than one sample.
            AudioError: Decoding failed (from an :class:`~server.audio.decode.AudioStream`).
        """
        rate = self.sample_rate
        max_len = int(max_span_s * rate)
        if max_len < 1:
            raise ValueError(f"max_span_s must be at least one sample long, got {max_span_s}")
        slack = int(slack_s * rate)
        want = max_len + max(slack, int(_VAD_CONTEXT_S * rate))
        buffer = self._carry
        if len(buffer) < want and not self.source.finished:
            more = self.source.read(want - len(buffer))
            buffer = np.concatenate((buffer, more)) if len(buffer) else more
        if not len(buffer):
            self._carry = buffer
            return None
        if self.source.finished and len(buffer) <= max_len + slack:
            piece, self._carry = buffer, np.empty(0, dtype=np.float32)
        else:
            search_len = max(1, min(int(max_len * _SEARCH_FRACTION), int(_SEARCH_MAX_S * rate)))
            lo = max(1, max_len - search_len)
            cut, how = _find_cut(buffer, lo, max_len, rate, use_vad=rate == SAMPLE_RATE)
            self._cuts[how] += 1
            piece, self._carry = buffer[:cut], buffer[cut:].copy()
        start, self._start = self._start, self._start + len(piece)
        return Piece(start, piece, rate, last=self.finished)

    def log_cuts(self) -> None:
        """Say how the cuts so far were placed, if any missed a pause between speech."""
        cuts = self._cuts
        if cuts["quiet"] or cuts["limit"]:
            logger.info(
                "cut %.0f s into %d pieces; %d cuts found no pause between speech%s and went to "
                "the quietest 100 ms (%d) or the piece limit (%d)",
                self._start / self.sample_rate,
                sum(cuts.values()) + 1,
                cuts["quiet"] + cuts["limit"],
                "" if self.sample_rate == SAMPLE_RATE else f" (no VAD at {self.sample_rate} Hz)",
                cuts["quiet"],
                cuts["limit"],
            )


def pcm_slice(samples: np.ndarray, span: AudioSpan) -> np.ndarray:
    """The samples of ``span`` (a view, not a copy)."""
    return samples[span.start : span.end]


def _find_cut(
    samples: np.ndarray, lo: int, hi: int, sample_rate: int, *, use_vad: bool
) -> tuple[int, str]:
    """Where to cut in ``[lo, hi]``, and how it was chosen (``pause``, ``quiet`` or ``limit``)."""
    width = int(_ENERGY_WINDOW_S * sample_rate)
    if width < 1 or hi - lo < width:
        return hi, "limit"
    hop = max(1, int(_ENERGY_HOP_S * sample_rate))
    region = np.asarray(samples[lo:hi], dtype=np.float64)
    energy = np.concatenate(([0.0], np.cumsum(region * region)))

    def quietest(a: int, b: int) -> tuple[float, int]:
        """Level in dB of the quietest window in ``region[a:b]``, and that window's centre."""
        w = min(width, b - a)
        starts = np.arange(a, b - w + 1, hop)
        power = (energy[starts + w] - energy[starts]) / w
        i = int(np.argmin(power))
        return 10 * float(np.log10(power[i] + 1e-10)), int(starts[i]) + w // 2

    if use_vad:
        pauses = [(a - lo, b - lo) for a, b in _vad_pauses(samples, lo, hi)]
        pauses = [p for p in pauses if p[1] - p[0] >= width] or pauses
        if pauses:
            levels = [quietest(a, b)[0] for a, b in pauses]
            floor = min(levels)
            quiet = [
                pause
                for pause, level in zip(pauses, levels, strict=True)
                if level <= floor + _PAUSE_LEVEL_TOLERANCE_DB
            ]
            a, b = max(quiet, key=lambda p: (p[1] - p[0], p[0]))
            return lo + (a + b) // 2, "pause"
    return lo + quietest(0, hi - lo)[1], "quiet"


def _vad_pauses(samples: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The stretches of ``[lo, hi]`` between speech; none if the VAD hears no speech at all."""
    context = int(_VAD_CONTEXT_S * SAMPLE_RATE)
    begin = max(0, lo - context)
    end = min(len(samples), hi + context)
    window = np.asarray(samples[begin:end], dtype=np.float32)
    speech = speech_timestamps(window, _VAD_OPTIONS)
    if not speech:
        return []
    pauses = []
    pause_start = lo
    for segment in [*speech, {"start": end - begin, "end": end - begin}]:
        pause_end = min(hi, begin + segment["start"])
        if pause_end > pause_start:
            pauses.append((pause_start, pause_end))
        pause_start = max(pause_start, begin + segment["end"])
    return pauses
