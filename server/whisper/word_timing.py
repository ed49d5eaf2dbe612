"""Word times fitted to the speech Silero VAD hears: a pause belongs to no word.

Whisper's word times come from aligning the text to the audio through the decoder's
cross-attention (dynamic time warping), which hands every frame to some token. Around a
pause that goes wrong in two ways (``bench/word_timing.py`` measures both):

- The first word after a pause starts inside the pause, often where the word before it ended,
  or (on the scheduler's path) at the start of its VAD window, which is padded by 400 ms.
- The last word before a pause ends early. Its ``.`` or ``,`` is a token of its own that takes
  the word's last frames, and faster-whisper's ``merge_punctuations`` glues the mark to the
  word's text but keeps the word's own end.

:func:`fit_words` moves each word's edges onto speech found by a second, unpadded VAD pass
(:func:`speech_spans`): an edge inside a pause moves to the speech beside it; a word that spans
a pause keeps the side before it when its text ends a clause, else the side after it; and the
first word of a stretch of speech starts where the speech starts, the last one ends where it
ends, each moved by at most ``reach`` seconds. Words that overlap no speech at all (speech the
VAD did not hear, which Whisper may still have transcribed) are left as they are.
Pure functions of the words and the speech spans; only :func:`speech_spans` runs a model.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import numpy as np

from server.whisper.runner import SAMPLE_RATE, speech_timestamps

#: A stretch of speech, ``(start, end)`` in seconds.
Span = tuple[float, float]

#: Silero VAD options for word edges: speech padded by 30 ms (Silero's 32 ms frames), split at
#: pauses of 100 ms or more. The scheduler cuts windows with 400 ms of padding instead, too
#: coarse for a word's edge.
SPEECH_VAD = {"speech_pad_ms": 30, "min_silence_duration_ms": 100}

#: How far (seconds) the first or last word of a stretch of speech may move to reach its edge.
#: It bounds the harm where Whisper left out a word there (a filler like "um" is often dropped).
REACH_S = 0.3

# Marks after which a pause is expected: a word ending in one keeps the side before a pause.
_CLAUSE_END = tuple(".,;:!?…。，、；：！？")


class WordLike(Protocol):
    """What :func:`fit_words` reads from a word (a dataclass: faster-whisper's ``Word`` or
    :class:`server.transcript.Word`)."""

    @property
    def word(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...


W = TypeVar("W", bound=WordLike)
S = TypeVar("S")


def speech_spans(audio: np.ndarray, *, offset: float = 0.0) -> list[Span]:
    """Where Silero VAD hears speech in ``audio`` (16 kHz mono), in seconds plus ``offset``.

    About 4 ms a second of audio on one CPU core.
    """
    return [
        (offset + s["start"] / SAMPLE_RATE, offset + s["end"] / SAMPLE_RATE)
        for s in speech_timestamps(audio, SPEECH_VAD)
    ]


def fit_words(
    words: Sequence[W],
    speech: Sequence[Span],
    *,
    reach: float = REACH_S,
    previous_end: float | None = None,
    next_start: float | None = None,
) -> list[W]:
    """The words with their edges moved onto the speech (see the module docstring).

    Args:
        words: Consecutive words in time order (dataclasses with ``word``, ``start``, ``end``).
        speech: Stretches of speech in time order, not overlapping, in the words' timeline.
        reach: The most the first or last word of a stretch of speech moves toward its edge.
        previous_end: End of the word just before ``words``, when it is known (an earlier
            window or segment), so that the first word does not reach back over it.
        next_start: Start of the word just after ``words``, when it is known.

    Returns:
        New words (``dataclasses.replace``), times rounded to the millisecond; a word is never
        made longer than from its own start to its own end plus ``reach`` either side. Fit a
        word once: a second pass may move an edge that is still short of the speech's edge by
        another ``reach``.
    """
    if not words or not speech:
        return list(words)
    starts = [s for s, _ in speech]
    trimmed = [_trim(w, speech, starts) for w in words]
    before = -math.inf if previous_end is None else previous_end
    after = math.inf if next_start is None else next_start
    fitted = []
    for i, (w, (start, end)) in enumerate(zip(words, trimmed, strict=True)):
        prev_end = trimmed[i - 1][1] if i else before
        next_begin = trimmed[i + 1][0] if i + 1 < len(trimmed) else after
        span = _containing(start, speech, starts)
        if span is not None and prev_end <= span[0]:  # the first word of this speech
            start = max(span[0], start - reach)
        span = _containing(end, speech, starts, closed_right=True)
        if span is not None and next_begin >= span[1]:  # the last word of this speech
            end = min(span[1], end + reach)
        fitted.append(replace(w, start=round(start, 3), end=round(end, 3)))  # type: ignore[type-var]
    return fitted


def fit_segments(
    segments: Sequence[S],
    speech: Sequence[Span],
    *,
    reach: float = REACH_S,
    previous_end: float | None = None,
    next_start: float | None = None,
) -> list[S]:
    """:func:`fit_words` over the words of consecutive segments (one window's, or one piece's),
    each segment's ``start`` and ``end`` then set to its first word's start and last word's
    end, as faster-whisper's ``restore_speech_timestamps`` does. Segments without words are
    returned as they are.

    Args:
        segments: Dataclasses with ``words`` (a list or tuple, or ``None``), ``start``, ``end``
            (faster-whisper's ``Segment`` or :class:`server.transcript.Segment`).
        speech, reach, previous_end, next_start: As for :func:`fit_words`.
    """
    groups: list[Any] = [getattr(s, "words", None) or () for s in segments]
    flat = [w for group in groups for w in group]
    fitted = iter(
        fit_words(flat, speech, reach=reach, previous_end=previous_end, next_start=next_start)
    )
    out = []
    for segment, group in zip(segments, groups, strict=True):
        if not group:
            out.append(segment)
            continue
        words = [next(fitted) for _ in group]
        out.append(
            replace(  # type: ignore[type-var]
                segment, words=type(group)(words), start=words[0].start, end=words[-1].end
            )
        )
    return out


def _trim(word: WordLike, speech: Sequence[Span], starts: list[float]) -> tuple[float, float]:
    """The word's edges moved out of pauses, keeping one side of a pause it spans."""
    first = max(0, bisect.bisect_right(starts, word.start) - 1)
    if speech[first][1] <= word.start:
        first += 1
    last = bisect.bisect_left(starts, max(word.end, word.start + 1e-9)) - 1
    if first >= len(speech) or last < first:
        return word.start, word.end  # no speech under the word: leave it
    if last > first:  # spans a pause: keep one side of it
        if word.word.strip().endswith(_CLAUSE_END):
            last = first
        else:
            first = last
    return max(word.start, speech[first][0]), min(word.end, speech[last][1])


def _containing(
    t: float, speech: Sequence[Span], starts: list[float], *, closed_right: bool = False
) -> Span | None:
    """The stretch of speech that holds time ``t`` (its end included when ``closed_right``)."""
    i = bisect.bisect_right(starts, t) - 1
    if closed_right and i >= 0 and speech[i][0] == t and i > 0:
        i -= 1
    if i < 0:
        return None
    start, end = speech[i]
    inside = start <= t <= end if closed_right else start <= t < end
    return speech[i] if inside else None


__all__ = ["REACH_S", "SPEECH_VAD", "Span", "fit_segments", "fit_words", "speech_spans"]
