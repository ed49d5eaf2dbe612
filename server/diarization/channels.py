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

Each channel is transcribed in full, so the work grows with the channels: files of more than
``MAX_CHANNELS`` are diarized as one mix (``auto``) or refused (``on``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from server.audio.pieces import AudioSource

logger = logging.getLogger(__name__)

FRAME = 160  # 10 ms at 16 kHz
#: Channels less correlated than this (waveform and loudness envelope) are different speakers.
MAX_CORRELATION = 0.5
#: A channel this much quieter than the loudest one is only hearing the other side's echo.
BLEED_DB = 20.0
#: Most channels diarized one by one (a call has two; a meeting recorder up to eight).
MAX_CHANNELS = 8
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


def measure(stream: AudioSource) -> ChannelLevels:
    """Read a stream of every channel once and measure them (levels, correlations); holds only
    the levels.

    Args:
        stream: Samples of every channel: ``read`` returns ``(samples, channels)`` (an
            :class:`~server.audio.decode.AudioStream` opened with ``channel="all"``). It is read to
            the end; closing it stays the caller's.

    Raises:
        AudioError: the upload does not decode.
    """
    levels: list[np.ndarray] = []
    cross: np.ndarray | None = None
    while not stream.finished:
        block = stream.read(_READ).astype(np.float64)
        if not len(block):
            break
        cross = block.T @ block if cross is None else cross + block.T @ block
        whole = len(block) // FRAME * FRAME
        power = np.square(block[:whole]).reshape(-1, FRAME, block.shape[1]).mean(axis=1)
        levels.append(10 * np.log10(power.T + 1e-12))
    if cross is None:
        return ChannelLevels(np.zeros((1, 0), dtype=np.float32), 1.0, 1.0)
    channels = cross.shape[0]
    level = np.concatenate(levels, axis=1)
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
    channel muted (an :class:`~server.audio.pieces.AudioSource`).

    Args:
        stream: The channel's samples (an :class:`~server.audio.decode.AudioStream` opened with
            ``channel=c``); closed with this source.
        channel: Which channel.
        gain: Per 10 ms frame, 1 to keep and 0 to mute (:meth:`ChannelLevels.gain`).
    """

    def __init__(self, stream: AudioSource, channel: int, gain: np.ndarray) -> None:
        self.channel = channel
        self._stream = stream
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
