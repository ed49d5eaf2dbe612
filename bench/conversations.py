"""Conversations built from real recordings of different people, with their true turns.

Each speaker's recordings are cut at pauses into utterances of a few seconds; a conversation
alternates turns of 2-4 speakers (never the same one twice running) with short pauses between
them, so the truth is known to the sample. Used by ``bench/diarization.py`` and by
``tests/test_diarization.py`` (which builds one from clips in ``tests/data``).
"""

from __future__ import annotations

import io
import random
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 16000


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float
    text: str = ""


@dataclass(frozen=True, eq=False)
class Conversation:
    name: str
    samples: np.ndarray
    turns: tuple[Turn, ...]

    @property
    def speakers(self) -> list[str]:
        return list(dict.fromkeys(t.speaker for t in self.turns))

    @property
    def duration(self) -> float:
        return len(self.samples) / RATE

    def wav(self) -> bytes:
        return to_wav(self.samples)


def to_wav(samples: np.ndarray, channels: int = 1) -> bytes:
    """16-bit PCM WAV bytes of float samples (``(n,)``, or ``(channels, n)``)."""
    pcm = np.clip(np.round(np.asarray(samples) * 32767), -32768, 32767).astype("<i2")
    if channels > 1:
        pcm = pcm.T.reshape(-1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def load(
    path: Path, start: float = 0.0, end: float | None = None, channel: int | None = None
) -> np.ndarray:
    """A recording (or a stretch of it) as 16 kHz mono float32, decoded as the server does."""
    from server.audio.decode import decode_audio

    if channel is not None:
        with wave.open(str(path)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            assert w.getframerate() == RATE
            samples = pcm.reshape(-1, w.getnchannels())[:, channel].astype(np.float32) / 32768
    else:
        samples = decode_audio(path.read_bytes(), max_duration=3600).samples
    a = int(start * RATE)
    b = len(samples) if end is None else int(end * RATE)
    return samples[a:b]


def trim(samples: np.ndarray, floor_db: float = -45.0) -> np.ndarray:
    """The samples without leading and trailing silence (10 ms frames below ``floor_db`` under
    the loudest), so that a turn's true extent is its speech."""
    frames = len(samples) // 160
    if not frames:
        return samples
    power = np.square(samples[: frames * 160].reshape(frames, 160)).mean(axis=1)
    db = 10 * np.log10(power + 1e-12)
    loud = np.flatnonzero(db > db.max() + floor_db)
    if not loud.size:
        return samples
    return samples[loud[0] * 160 : (loud[-1] + 1) * 160]


def build(
    name: str,
    utterances: Sequence[tuple[str, np.ndarray, str]],
    *,
    pauses: Sequence[float] = (0.5,),
    lead: float = 0.3,
) -> Conversation:
    """Join utterances ``(speaker, samples, text)`` in order, with the given pauses between
    them (cycled), into one recording and its turns."""
    parts: list[np.ndarray] = [np.zeros(int(lead * RATE), np.float32)]
    turns: list[Turn] = []
    t = lead
    for i, (speaker, samples, text) in enumerate(utterances):
        speech = trim(samples)
        turns.append(Turn(speaker, t, t + len(speech) / RATE, text))
        parts.append(speech.astype(np.float32))
        gap = pauses[i % len(pauses)]
        parts.append(np.zeros(int(gap * RATE), np.float32))
        t += len(speech) / RATE + int(gap * RATE) / RATE
    return Conversation(name, np.concatenate(parts), tuple(turns))


def alternate(
    name: str,
    pools: dict[str, list[np.ndarray]],
    *,
    turns: int,
    seed: int,
    pause_range: tuple[float, float] = (0.3, 1.0),
) -> Conversation:
    """A conversation of ``turns`` turns among the speakers of ``pools``, picked at random (a
    fixed seed) but never the same speaker twice running, each turn the speaker's next
    utterance, every speaker heard at least once."""
    rng = random.Random(seed)
    speakers = list(pools)
    order: list[str] = []
    rng.shuffle(speakers)
    order += speakers  # everyone speaks early
    while len(order) < turns:
        order.append(rng.choice([s for s in speakers if s != order[-1]]))
    used = dict.fromkeys(speakers, 0)
    utterances = []
    for speaker in order:
        pool = pools[speaker]
        utterances.append((speaker, pool[used[speaker] % len(pool)], ""))
        used[speaker] += 1
    pauses = [rng.uniform(*pause_range) for _ in range(len(order))]
    return build(name, utterances, pauses=pauses)


def cut_at_pauses(
    samples: np.ndarray, *, shortest: float = 2.0, longest: float = 7.0
) -> list[np.ndarray]:
    """Utterances of ``shortest``-``longest`` seconds, cut at the pauses the VAD hears."""
    from server.whisper.runner import speech_timestamps

    speech = speech_timestamps(samples, {"min_silence_duration_ms": 250, "speech_pad_ms": 50})
    out: list[np.ndarray] = []
    start = None
    for i, region in enumerate(speech):
        start = region["start"] if start is None else start
        length = (region["end"] - start) / RATE
        nxt = speech[i + 1]["end"] if i + 1 < len(speech) else None
        longer = nxt is not None and (nxt - start) / RATE > longest
        if (length >= shortest and longer) or nxt is None or length >= longest:
            if length >= shortest * 0.75:
                out.append(samples[start : region["end"]])
            start = None
    return out
