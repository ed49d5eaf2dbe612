"""Recordings whose channels are the speakers: a call recorded with each side on its own
channel. Each channel is transcribed on its own, so that each side's words are heard once, by
the channel they were said into, and its speaker is its channel.

The rule (``diarize_by_channel=auto``): a file with two or more channels is diarized by
channel when its channels carry different signals -- their waveforms are uncorrelated
(|r| < 0.5) and so are their loudness envelopes over speech (r < 0.5). A mono recording copied
to both channels has r = 1; a room recorded by two microphones has envelopes that rise and fall
together; the two sides of a call do neither. ``on`` and ``off`` force the choice.

A side's voice often leaks faintly into the other side's channel (line echo, a headset's
crosstalk). Where a channel is more than ``BLEED_DB`` quieter than the loudest channel, it is
muted before transcription, so that leaked words are not transcribed a second time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from server.audio import AudioStream

logger = logging.getLogger(__name__)

FRAME = 160  # 10 ms at 16 kHz
#: Channels less correlated than this (waveform and loudness envelope) are different speakers.
MAX_CORRELATION = 0.5
#: A channel this much quieter than the loudest one is only hearing the other side's echo.
BLEED_DB = 20.0
_READ = 16000 * 10
_SILENT_DB = -60.0


@dataclass(frozen=True, eq=False)
class ChannelLevels:
    """What the channels of a file carry, from one pass over it.

    Attributes:
        levels: ``(channels, frames)`` the level of each 10 ms frame, in dBFS.
        correlation: Correlation of the channels' waveforms (the largest absolute value over
            pairs of channels, so that any two alike count).
        envelope_correlation: Correlation of the loudness envelopes over frames where any
            channel speaks (the largest over pairs).
    """

    levels: np.ndarray
    correlation: float
    envelope_correlation: float

    @property
    def separate(self) -> bool:
        """Whether the channels carry different voices (the ``auto`` rule)."""
        return self.correlation < MAX_CORRELATION and self.envelope_correlation < MAX_CORRELATION

    def gain(self, channel: int) -> np.ndarray:
        """Per 10 ms frame, 1 where ``channel`` is its own side and 0 where it only echoes
        a louder channel."""
        loudest = self.levels.max(axis=0)
        return (self.levels[channel] >= loudest - BLEED_DB).astype(np.float32)


def measure(data: bytes, channels: int, *, max_duration: float) -> ChannelLevels:
    """Decode each channel once and measure it (levels, correlations); holds only the levels.

    Raises:
        AudioError: the upload does not decode.
    """
    streams = [AudioStream(data, max_duration=max_duration, channel=c) for c in range(channels)]
    levels: list[list[np.ndarray]] = [[] for _ in streams]
    cross = np.zeros((channels, channels))
    try:
        while not all(s.finished for s in streams):
            blocks = [s.read(_READ).astype(np.float64) for s in streams]
            n = min(len(b) for b in blocks)
            if n == 0:
                break
            blocks = [b[:n] for b in blocks]
            cross += np.array([[a @ b for b in blocks] for a in blocks])
            whole = n // FRAME * FRAME
            for c, block in enumerate(blocks):
                power = np.square(block[:whole]).reshape(-1, FRAME).mean(axis=1)
                levels[c].append(10 * np.log10(power + 1e-12))
    finally:
        for s in streams:
            s.close()
    level = np.stack([np.concatenate(parts) if parts else np.zeros(0) for parts in levels])
    diag = np.sqrt(np.maximum(np.diag(cross), 1e-12))
    corr = cross / np.outer(diag, diag)
    active = level.max(axis=0) > max(_SILENT_DB, float(level.max(initial=-120.0)) - 40.0)
    envelope = 0.0
    waveform = 0.0
    for a in range(channels):
        for b in range(a + 1, channels):
            waveform = max(waveform, abs(float(corr[a, b])))
            if active.sum() > 10:
                x, y = level[a, active], level[b, active]
                if x.std() > 0 and y.std() > 0:
                    envelope = max(envelope, float(np.corrcoef(x, y)[0, 1]))
                else:
                    envelope = 1.0
    return ChannelLevels(level.astype(np.float32), waveform, envelope)


class ChannelSource:
    """One channel of an upload, decoded as it is read, with the frames that only echo another
    channel muted (an :class:`~server.pieces.AudioSource`).

    Args:
        data: The uploaded bytes.
        channel: Which channel.
        gain: Per 10 ms frame, 1 to keep and 0 to mute (:meth:`ChannelLevels.gain`).
        max_duration: Longest audio accepted, in seconds.
    """

    def __init__(self, data: bytes, channel: int, gain: np.ndarray, *, max_duration: float) -> None:
        self.channel = channel
        self._stream = AudioStream(data, max_duration=max_duration, channel=channel)
        self._gain = np.repeat(gain, FRAME)
        self._position = 0  # samples handed out so far

    @property
    def duration(self) -> float | None:
        return self._stream.duration

    @property
    def decoded_seconds(self) -> float:
        return self._stream.decoded_seconds

    @property
    def finished(self) -> bool:
        return self._stream.finished

    def read(self, max_samples: int) -> np.ndarray:
        start = self._position
        samples = self._stream.read(max_samples)
        self._position += len(samples)
        gain = self._gain[start : start + len(samples)]
        if len(gain) < len(samples):
            gain = np.pad(gain, (0, len(samples) - len(gain)), constant_values=1.0)
        return samples * gain

    def close(self) -> None:
        self._stream.close()
