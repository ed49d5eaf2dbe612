"""One request's diarization: the speech of each piece embedded window by window into the
request's :class:`~server.diarization.speakers.SpeakerTrack`, and the transcript's segments
labelled (and split where the speaker changes inside one) from it."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from server.diarization.encoder import HOP, SAMPLE_RATE, WINDOW_FRAMES, SpeakerEncoder
from server.diarization.speakers import KnownSpeaker, SpeakerTrack
from server.transcript import Segment, Word
from server.whisper.runner import speech_timestamps

logger = logging.getLogger(__name__)

#: A new window every 0.8 s of speech: each 1.6 s window then speaks for its central 0.8 s.
#: (The bench's DER was the same at 0.4 s, 9.6 %, for twice the work.)
HOP_FRAMES = 80
# Silero VAD cuts speech at pauses this short, so that a turn change at a short pause falls
# between windows rather than inside one.
_VAD = {"min_silence_duration_ms": 150, "speech_pad_ms": 30, "min_speech_duration_ms": 200}
# Speech shorter than this is not embedded: padded to a window, a word or two embeds too
# unreliably (a 0.5 s "ask not" came out nearer another voice than its own speaker). It
# takes the speaker of the nearest speech.
_MIN_SPEECH_S = 0.8
# A speaker change inside a segment is believed only for a run of at least this much speech.
_MIN_RUN_S = 0.6


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class DiarizationOptions:
    """What a request asks of diarization.

    Attributes:
        min_speakers: At least this many speakers (``min_speakers``), or None.
        max_speakers: At most this many (``max_speakers``), or None.
        references: ``(name, 16 kHz samples)`` of each known speaker's reference clip.
        by_channel: ``auto`` (channels are speakers when they carry different voices), ``on``
            or ``off``.
    """

    min_speakers: int | None = None
    max_speakers: int | None = None
    references: tuple[tuple[str, np.ndarray], ...] = ()
    by_channel: str = "auto"


class Diarizer:
    """Diarizes one request piece by piece.

    Args:
        encoder: The speaker encoder.
        options: The request's options.
    """

    def __init__(self, encoder: SpeakerEncoder, options: DiarizationOptions) -> None:
        self.encoder = encoder
        known = tuple(KnownSpeaker(name, encoder.embed(clip)) for name, clip in options.references)
        self.track = SpeakerTrack(
            known=known, min_speakers=options.min_speakers, max_speakers=options.max_speakers
        )
        self.windows = 0

    def add_piece(self, samples: np.ndarray, offset: float, *, channel: int | None = None) -> None:
        """Embed the speech of one piece (``offset`` seconds into the file) and add it to the
        track. With ``channel``, the piece is one channel's audio and its speech is that
        channel's speaker."""
        embeddings, spans = self.embed_speech(samples)
        self.windows += len(embeddings)
        self.track.add(embeddings, spans + offset, channel=channel)

    def embed_speech(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of 1.6 s windows over the speech in ``samples``, and the span (seconds
        from its start) each speaks for."""
        regions = speech_timestamps(samples, _VAD)
        batches: list[np.ndarray] = []
        spans: list[tuple[float, float]] = []
        for region in regions:
            start, end = region["start"], region["end"]
            if (end - start) / SAMPLE_RATE < _MIN_SPEECH_S:
                continue
            feats = self.encoder.features(samples[start:end])
            windows, centres = _windows(feats)
            batches.append(windows)
            spans += _spans(centres, start / SAMPLE_RATE, end / SAMPLE_RATE)
        if not batches:
            return np.zeros((0, 256), np.float32), np.zeros((0, 2))
        embeddings = self.encoder.embed_frames(np.concatenate(batches))
        return embeddings, np.asarray(spans, dtype=np.float64)

    def label(self, segments: list[Segment], channels: list[int] | None = None) -> list[Segment]:
        """The segments with their speakers, in time order; a segment whose words change
        speaker for long enough is split there. Ids are left to the caller to renumber.

        Args:
            segments: Transcribed segments.
            channels: When channels are the speakers, the channel of each segment: that is its
                speaker, and it is never split.
        """
        names = self.track.names()
        out: list[Segment] = []
        for n, segment in enumerate(segments):
            if channels is not None:
                parts: list[tuple[Segment, int | None]] = [(segment, channels[n])]
            else:
                parts = self._parts(segment)
            for part, index in parts:
                speaker = names.get(index) if index is not None else None
                out.append(replace(part, speaker=speaker or "A"))
        return sorted(out, key=lambda s: (s.start, s.end))

    def _parts(self, segment: Segment) -> list[tuple[Segment, int | None]]:
        words = [w for w in segment.words or () if w.end > w.start]
        whole = self.track.speaker_at(segment.start, segment.end)
        if len(words) < 2:
            return [(segment, whole)]
        runs: list[tuple[int | None, list[Word]]] = []
        for word in words:
            who = self.track.speaker_at(word.start, word.end)
            if runs and runs[-1][0] == who:
                runs[-1][1].append(word)
            else:
                runs.append((who, [word]))
        # Runs too short to be a turn join the run before them (the first, the run after).
        merged: list[tuple[int | None, list[Word]]] = []
        for who, run in runs:
            if merged and (run[-1].end - run[0].start < _MIN_RUN_S or merged[-1][0] == who):
                merged[-1][1].extend(run)
            else:
                merged.append((who, run))
        if len(merged) > 1 and merged[0][1][-1].end - merged[0][1][0].start < _MIN_RUN_S:
            merged[1] = (merged[1][0], merged[0][1] + merged[1][1])
            merged.pop(0)
        if len(merged) == 1:
            return [(segment, merged[0][0] if merged[0][0] is not None else whole)]
        return [
            (
                replace(
                    segment,
                    start=run[0].start,
                    end=run[-1].end,
                    text="".join(w.word for w in run),
                    tokens=(),
                    words=tuple(run),
                    logprobs=None,
                ),
                who,
            )
            for who, run in merged
        ]


def speaker_shortfall(
    options: DiarizationOptions, segments: Sequence[Segment], channels: int = 0
) -> str | None:
    """Why a diarized transcript names fewer speakers than ``min_speakers`` asked for, or None
    when it names enough (the clustering cannot make voices that are not there, and quietly
    returning fewer would look like a met bound).

    Args:
        options: The request's diarization options.
        segments: The labelled segments, as rendered (those without text are left out).
        channels: How many channels were the speakers (a call), or 0.

    Returns:
        The reason, for the response's degradations (kind ``speakers``), or None.
    """
    wanted = options.min_speakers
    found = len({s.speaker for s in segments if s.text.strip()})
    if wanted is None or found >= wanted:
        return None
    if channels:
        why = f"the {channels} channels are the speakers"
    else:
        why = "the audio holds fewer distinct voices, or too little speech to tell more apart"
    speakers = "1 speaker was" if found == 1 else f"{found} speakers were"
    return f"min_speakers={wanted}, but {speakers} told apart: {why}"


def _windows(feats: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """1.6 s windows of a stretch of speech every 0.8 s, and their centres in seconds from its
    start. A stretch shorter than a window is one window, padded with silence before it (the
    LSTM's last state, which is the embedding, then follows the speech)."""
    if len(feats) < WINDOW_FRAMES:
        window = np.pad(feats, ((WINDOW_FRAMES - len(feats), 0), (0, 0)))
        return window[None], [len(feats) * HOP / SAMPLE_RATE / 2]
    starts = list(range(0, len(feats) - WINDOW_FRAMES + 1, HOP_FRAMES))
    if starts[-1] + WINDOW_FRAMES < len(feats):
        starts.append(len(feats) - WINDOW_FRAMES)  # the tail gets a window of its own
    windows = np.stack([feats[s : s + WINDOW_FRAMES] for s in starts])
    return windows, [(s + WINDOW_FRAMES / 2) * HOP / SAMPLE_RATE for s in starts]


def _spans(centres: list[float], start: float, end: float) -> list[tuple[float, float]]:
    """Split ``[start, end]`` between windows at the midpoints of their centres."""
    cuts = [start, *((a + b) / 2 + start for a, b in itertools.pairwise(centres)), end]
    return list(itertools.pairwise(cuts))
