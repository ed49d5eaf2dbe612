"""The Realtime API's input audio -> 16 kHz mono float32, one appended chunk at a time.

A live session sends raw samples, not files: 16-bit little-endian PCM at 24 kHz (``audio/pcm``,
beta ``pcm16``) or G.711 at 8 kHz (``audio/pcmu`` / ``g711_ulaw``, ``audio/pcma`` /
``g711_alaw``). The G.711 tables are computed here with numpy (``audioop`` left the standard
library in Python 3.13), and the rate is changed by a streaming polyphase FIR filter, so a sample
split across two appends, or a filter spanning two appends, gives the same samples as the whole
stream converted at once.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from server.runners import SAMPLE_RATE

#: The wire's input formats (beta names; the GA names map onto them in ``realtime_events``).
InputFormat = Literal["pcm16", "g711_ulaw", "g711_alaw"]

#: Samples per second of each input format (OpenAI's PCM is always 24 kHz, G.711 always 8 kHz).
INPUT_RATES: dict[str, int] = {"pcm16": 24000, "g711_ulaw": 8000, "g711_alaw": 8000}
#: Bytes per sample of each input format.
SAMPLE_BYTES: dict[str, int] = {"pcm16": 2, "g711_ulaw": 1, "g711_alaw": 1}


def _ulaw_table() -> np.ndarray:
    """ITU-T G.711 μ-law: the 16-bit linear value of each of the 256 code words."""
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """ITU-T G.711 A-law: the 16-bit linear value of each of the 256 code words."""
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


_G711 = {"g711_ulaw": _ulaw_table(), "g711_alaw": _alaw_table()}


def decode_g711(data: bytes, fmt: Literal["g711_ulaw", "g711_alaw"]) -> np.ndarray:
    """G.711 code words -> 16-bit linear samples (int16)."""
    return _G711[fmt][np.frombuffer(data, dtype=np.uint8)]


class Resampler:
    """A streaming polyphase resampler (``in_rate`` -> ``out_rate``, a rational ratio).

    The signal is zero-stuffed by L, low-pass filtered by a Kaiser-windowed sinc (flat to 87.5 %
    of the lower Nyquist frequency, 60 dB down at it, so nothing above 8 kHz folds into what
    Whisper hears) and kept every M-th sample. Only the outputs kept are computed. The
    samples a filter still needs are carried to the next call; the output lags the input by half
    the filter (under 2 ms).
    """

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE) -> None:
        g = math.gcd(in_rate, out_rate)
        self.up, self.down = out_rate // g, in_rate // g
        upsampled = in_rate * self.up
        nyquist = min(in_rate, out_rate) / 2
        passband = 0.875 * nyquist
        transition = (nyquist - passband) / upsampled
        # Kaiser's estimate for 60 dB of stop-band attenuation (beta 5.65).
        taps = math.ceil((60 - 7.95) / (2.285 * 2 * math.pi * transition)) | 1
        n = np.arange(taps) - (taps - 1) / 2
        fc = (passband + nyquist) / 2 / upsampled  # the sinc's -6 dB point: mid-transition
        h = 2 * fc * np.sinc(2 * fc * n) * np.kaiser(taps, 5.65) * self.up
        self._h = h.astype(np.float32)
        self._half = (taps - 1) // 2
        # Zeros before the first sample, so that the first output is centred on it.
        lead = -(-self._half // self.up)
        self._x = np.zeros(lead, dtype=np.float32)
        self._start = lead * self.up - self._half  # next filter start, in upsampled samples

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next stretch of the stream (float32 in, float32 out)."""
        if self.up == self.down == 1:
            return samples.astype(np.float32, copy=False)
        x = np.concatenate([self._x, samples.astype(np.float32, copy=False)])
        taps = len(self._h)
        last = len(x) * self.up - taps  # the last filter start with all its input known
        if last < self._start:
            self._x = x
            return np.zeros(0, dtype=np.float32)
        count = (last - self._start) // self.down + 1
        stuffed = np.zeros(len(x) * self.up, dtype=np.float32)
        stuffed[:: self.up] = x
        starts = self._start + self.down * np.arange(count)
        windows = np.lib.stride_tricks.sliding_window_view(stuffed, taps)[starts]
        out = windows @ self._h[::-1]
        self._start += count * self.down
        dropped = self._start // self.up
        self._x = x[dropped:]
        self._start -= dropped * self.up
        return out.astype(np.float32, copy=False)


class InputDecoder:
    """One session's appended audio -> 16 kHz mono float32, whatever the format.

    Bytes that end mid-sample are kept for the next append, and the resampler carries its
    filter across appends: the stream decodes the same however the client cut it.
    """

    def __init__(self, fmt: InputFormat) -> None:
        self.format = fmt
        self.rate = INPUT_RATES[fmt]
        self._resample = Resampler(self.rate)
        self._partial = b""

    def __call__(self, data: bytes) -> np.ndarray:
        """Decode one append's bytes."""
        data = self._partial + data
        width = SAMPLE_BYTES[self.format]
        whole = len(data) - len(data) % width
        self._partial = data[whole:]
        data = data[:whole]
        if self.format == "pcm16":
            linear = np.frombuffer(data, dtype="<i2")
        else:
            linear = decode_g711(data, self.format)
        return self._resample(linear.astype(np.float32) / 32768.0)

    def input_seconds(self, nbytes: int) -> float:
        """How long ``nbytes`` of this format play."""
        return nbytes / SAMPLE_BYTES[self.format] / self.rate


__all__ = ["INPUT_RATES", "InputDecoder", "InputFormat", "Resampler", "decode_g711"]
