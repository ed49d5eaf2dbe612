"""Where the windowed path cuts a file into windows (:func:`cut`): the speech Silero VAD hears, joined across
pauses it only half hears, packed into windows of at most ``chunk_length`` seconds that end
where the speech pauses longest.

``BatchedInferencePipeline`` keeps what VAD calls speech and fills each window with it to the
brim, cutting a stretch too long for one window at its last short dip. Three things were lost
that way (``bench/quiet_speakers.py``, tiny.en), all kept by faster-whisper without VAD:

- **Speech VAD only half hears.** In a reverberant room Silero's probability for a speaker
  stays between 0.1 and 0.5 (the threshold): 7.5 s of JFK in the middle of a far-field clip
  were never decoded. A pause between two stretches of speech where the probability's 90th
  percentile is at least :data:`WEAK_SPEECH` is joined to them; real pauses of read speech stay
  under 0.1, and noise, hum and music with no speech around them start no window at all.
- **The end of a full window.** Whisper often leaves the last sentence of a window unwritten
  when the voice changes there: a hoarse second speaker's first 5 s after a 2.4 s pause. When a
  window is at least :data:`MIN_FILL` seconds full and a pause in it is at least
  :data:`LONG_PAUSE` long and twice the pause at the brim, the window ends there instead.
- **A stretch too long for one window** (speech over background talk, where VAD never pauses)
  is cut at its least speech-like moment past :data:`MIN_FILL` seconds, not mid-sentence at
  the last 98 ms dip.

Silero runs once per file (on :func:`server.audio.loudness.loud_for_vad`'s copy, as every speech
decision in the server); its frames are turned into speech as ``get_speech_timestamps`` turns
them (threshold, negative threshold, minimum silence and speech, padding), without its split of
long stretches, which the packing does instead. Pure numpy beside the model call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from faster_whisper.vad import VadOptions, collect_chunks, get_vad_model

from server.audio import loudness
from server.audio.decode import SAMPLE_RATE
from server.audio.loudness import loud_for_vad

#: Samples Silero scores at a time (32 ms).
FRAME = 512
#: A pause between two stretches of speech where the 90th percentile of Silero's probability
#: reaches this is joined to them (speech heard only weakly: reverberant, hoarse, distant).
WEAK_SPEECH = 0.15
#: Pauses shorter than this are never joined: padding covers them already.
_MIN_JOIN = FRAME * 8
#: Seconds of speech a window holds before it may end early at a long pause, or before a
#: stretch too long for one window may be cut.
MIN_FILL = 15.0
#: Seconds of pause at which a window may end early (also twice the pause at the brim).
LONG_PAUSE = 1.0
#: Frames the probability is averaged over to find the least speech-like moment (0.29 s).
_SMOOTH = 9

Span = dict[str, int]


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """Silero VAD's speech probability for each 512-sample frame of ``audio`` (16 kHz mono),
    heard at the level :func:`loud_for_vad` brings it to; padded as ``get_speech_timestamps``
    pads it, so the frames and probabilities are the same as there."""
    heard = loud_for_vad(np.asarray(audio, dtype=np.float32))
    padded = np.pad(heard, (0, FRAME - len(heard) % FRAME))
    return np.asarray(get_vad_model()(padded), dtype=np.float32).reshape(-1)


def speech_spans(probabilities: np.ndarray, length: int, vad: VadOptions) -> list[Span]:
    """Speech in a file of ``length`` samples from its frame ``probabilities``, as
    ``get_speech_timestamps`` finds it with ``max_speech_duration_s`` unlimited: speech starts
    at a frame at ``threshold`` or above, ends after ``min_silence_duration_ms`` under the
    negative threshold, is kept when longer than ``min_speech_duration_ms``, and is padded by
    ``speech_pad_ms`` (half the pause each side where two spans are closer than twice that)."""
    threshold = vad.threshold
    negative = vad.neg_threshold if vad.neg_threshold is not None else max(threshold - 0.15, 0.01)
    min_silence = SAMPLE_RATE * vad.min_silence_duration_ms / 1000
    min_speech = SAMPLE_RATE * vad.min_speech_duration_ms / 1000
    pad = SAMPLE_RATE * vad.speech_pad_ms / 1000

    spans: list[Span] = []
    start: int | None = None
    silent_from = 0  # where the current silence began (0: none)
    for i, p in enumerate(probabilities.tolist()):
        at = FRAME * i
        if p >= threshold:
            silent_from = 0
            if start is None:
                start = at
                continue
        if start is not None and p < negative:
            if not silent_from:
                silent_from = at
            if at - silent_from < min_silence:
                continue
            if silent_from - start > min_speech:
                spans.append({"start": start, "end": silent_from})
            start, silent_from = None, 0
    if start is not None and length - start > min_speech:
        spans.append({"start": start, "end": length})

    for i, span in enumerate(spans):
        if i == 0:
            span["start"] = int(max(0, span["start"] - pad))
        if i + 1 < len(spans):
            after = spans[i + 1]
            pause = after["start"] - span["end"]
            if pause < 2 * pad:
                span["end"] += int(pause // 2)
                after["start"] = int(max(0, after["start"] - pause // 2))
            else:
                span["end"] = int(min(length, span["end"] + pad))
                after["start"] = int(max(0, after["start"] - pad))
        else:
            span["end"] = int(min(length, span["end"] + pad))
    return spans


def join_weak_pauses(spans: Sequence[Span], probabilities: np.ndarray) -> list[Span]:
    """``spans`` with each pause between two of them that VAD half hears as speech (see
    :data:`WEAK_SPEECH`) joined to them."""
    joined: list[Span] = []
    for span in spans:
        if joined:
            last = joined[-1]
            first, end = last["end"] // FRAME, span["start"] // FRAME
            if span["start"] - last["end"] >= _MIN_JOIN and end > first:
                if np.percentile(probabilities[first:end], 90) >= WEAK_SPEECH:
                    last["end"] = span["end"]
                    continue
        joined.append(dict(span))
    return joined


def pack(spans: Sequence[Span], probabilities: np.ndarray, max_seconds: float) -> list[list[Span]]:
    """``spans`` in windows of at most ``max_seconds`` of speech each (a span too long to fit is
    cut in two), in order; see the module's docstring for where a window ends."""
    limit = int(max_seconds * SAMPLE_RATE)
    min_fill = int(min(MIN_FILL, max_seconds / 2) * SAMPLE_RATE)
    windows: list[list[Span]] = []
    current: list[Span] = []
    fill = 0
    queue = [dict(s) for s in reversed(spans)]  # popped from the end: in order
    while queue:
        span = queue.pop()
        size = span["end"] - span["start"]
        if fill + size <= limit:
            current.append(span)
            fill += size
            continue
        if fill >= min_fill:  # full enough: end the window, at a long pause if it has one
            keep = _long_pause(current, span, min_fill)
            windows.append(current[:keep])
            current = current[keep:]
            fill = sum(s["end"] - s["start"] for s in current)
            queue.append(span)
            continue
        # Too little in the window to end it here: cut the span at its least speech-like
        # moment that leaves the window at least min_fill full.
        first, last = span["start"] + min_fill - fill, span["start"] + limit - fill
        at = _quietest(probabilities, first, last)
        current.append({"start": span["start"], "end": at})
        queue.append({"start": at, "end": span["end"]})
        windows.append(current)
        current, fill = [], 0
    if current:
        windows.append(current)
    return windows


def _long_pause(window: list[Span], after: Span, min_fill: int) -> int:
    """How many of ``window``'s spans to keep when the next span, ``after``, does not fit: all of
    them, or those before the longest pause at least :data:`LONG_PAUSE` long and twice the
    pause before ``after``, that leaves the window at least ``min_fill`` full."""
    brim = after["start"] - window[-1]["end"]
    best, longest = len(window), max(LONG_PAUSE * SAMPLE_RATE, 2 * brim)
    fill = 0
    for i in range(1, len(window)):
        fill += window[i - 1]["end"] - window[i - 1]["start"]
        pause = window[i]["start"] - window[i - 1]["end"]
        if fill >= min_fill and pause >= longest:
            best, longest = i, pause
    return best


def _quietest(probabilities: np.ndarray, first: int, last: int) -> int:
    """The sample, on a frame edge in ``[first, last]``, where the speech probability averaged
    over 0.29 s is lowest (the middle of the last run of such frames)."""
    lo, hi = -(-first // FRAME), last // FRAME
    if hi <= lo:
        return max(first, min(last, lo * FRAME))
    half = _SMOOTH // 2
    around = probabilities[max(0, lo - half) : hi + half + 1]
    smooth = np.convolve(around, np.ones(_SMOOTH) / _SMOOTH, mode="same")
    smooth = smooth[lo - max(0, lo - half) :][: hi - lo + 1]
    lowest = np.flatnonzero(smooth <= smooth.min() + 1e-6)
    breaks = np.flatnonzero(np.diff(lowest) > 1)
    run = lowest[breaks[-1] + 1 :] if len(breaks) else lowest
    return (lo + int(run[len(run) // 2])) * FRAME


def cut(
    audio: np.ndarray,
    *,
    vad_filter: bool,
    vad_parameters: Mapping[str, Any] | VadOptions | None,
    chunk_length: int,
) -> tuple[list[Span], list[np.ndarray], list[dict[str, Any]]]:
    """The windowed path's windows of ``audio``: the speech spans they hold (in order), each
    window's audio, and its offset and duration on the speech-only timeline, as
    ``BatchedInferencePipeline.transcribe`` gives them (``collect_chunks``), with the windows
    cut as the module's docstring says. Without VAD, audio longer than one window (which the
    pipeline refuses) is cut every ``chunk_length`` seconds."""
    if not vad_filter:
        step = chunk_length * SAMPLE_RATE
        clips = [
            {"start": start, "end": min(start + step, len(audio))}
            for start in range(0, len(audio), step)
        ]
        chunks, metadata = collect_chunks(audio, clips, max_duration=chunk_length)
        return clips, chunks, metadata
    # A window's length, not max_speech_duration_s, bounds a stretch of speech here.
    if vad_parameters is None:
        vad = VadOptions(min_silence_duration_ms=160)
    elif isinstance(vad_parameters, VadOptions):
        vad = vad_parameters
    else:
        vad = VadOptions(**vad_parameters)
    heard, windows = windows_of(audio, vad, chunk_length)
    # Quiet stretches of speech raised, so that a quiet speaker in a window beside a loud one
    # is decoded too; the copy is dropped once its windows are copied out.
    audio = loudness.for_decoder(audio, heard)
    chunks, metadata, at = [], [], 0
    for window in windows:
        chunks.append(np.concatenate([audio[s["start"] : s["end"]] for s in window]))
        size = sum(s["end"] - s["start"] for s in window)
        metadata.append({"offset": at / SAMPLE_RATE, "duration": size / SAMPLE_RATE})
        at += size
    return [s for w in windows for s in w], chunks, metadata


def windows_of(
    audio: np.ndarray, vad: VadOptions, max_seconds: float
) -> tuple[list[Span], list[list[Span]]]:
    """The speech VAD hears in ``audio``, and that speech with half-heard pauses joined,
    packed in windows: ``(heard, windows)``."""
    probabilities = speech_probabilities(audio)
    heard = speech_spans(probabilities, len(audio), vad)
    return heard, pack(join_weak_pauses(heard, probabilities), probabilities, max_seconds)


__all__ = [
    "LONG_PAUSE",
    "MIN_FILL",
    "WEAK_SPEECH",
    "cut",
    "join_weak_pauses",
    "pack",
    "speech_probabilities",
    "speech_spans",
    "windows_of",
]
