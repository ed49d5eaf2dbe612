"""The Realtime API's input audio -> 16 kHz mono float32, one appended chunk at a time.

A live session sends raw samples, not files: 16-bit little-endian PCM at 24 kHz (``audio/pcm``,
beta ``pcm16``) or G.711 at 8 kHz (``audio/pcmu`` / ``g711_ulaw``, ``audio/pcma`` /
``g711_alaw``). The G.711 tables are computed here with numpy (``audioop`` left the standard
library in Python 3.13), and the rate is changed by a streaming polyphase FIR filter, so a sample
split across two appends, or a filter spanning two appends, gives the same samples as the whole
stream converted at once. An append is decoded a second of audio at a time, so its working
memory is a second's whatever its size, and how many samples it gives is known before a byte of
it is decoded (:meth:`InputDecoder.samples_for`).
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from server.whisper.runner import SAMPLE_RATE

#: The wire's input formats (beta names; ``session_config`` maps the GA names onto them).
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


#: Seconds of audio decoded at a time, at most: the working memory of an append, and the
#: stretch the session takes in at once (WHISPER_REALTIME_MAX_ITEM_SECONDS is 1 s or more, so
#: one slice crosses the end of an item at most once).
SLICE_SECONDS = 1.0
#: What ``base64.b64decode(..., validate=True)`` accepts, checked before any of it is decoded.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")

_G711 = {"g711_ulaw": _ulaw_table(), "g711_alaw": _alaw_table()}


@dataclass(frozen=True)
class Piece:
    """A slice of an append, decoded: 16 kHz samples and, with server VAD, the speech
    probability of each VAD frame they complete."""

    samples: np.ndarray
    probabilities: np.ndarray | None


def base64_size(text: str) -> int:
    """The bytes base64 ``text`` holds, read from its length (nothing is decoded)."""
    padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    return max(0, len(text) * 3 // 4 - padding)


def decode_g711(data: bytes, fmt: Literal["g711_ulaw", "g711_alaw"]) -> np.ndarray:
    """G.711 code words -> 16-bit linear samples (int16)."""
    return _G711[fmt][np.frombuffer(data, dtype=np.uint8)]


class Resampler:
    """A streaming polyphase resampler (``in_rate`` -> ``out_rate``, a rational ratio).

    The signal is zero-stuffed by L, low-pass filtered by a Kaiser-windowed sinc (flat to 87.5 %
    of the lower Nyquist frequency, 60 dB down at it, so nothing above 8 kHz folds into what
    Whisper hears) and kept every M-th sample. Only the outputs kept are computed, and only from
    the input samples their filter phase touches: each tap adds a strided view of the input to
    the outputs of its phase, so the memory is linear in the input (no copy of the input per
    output). The samples a filter still needs are carried to the next call; the output lags the
    input by half the filter (under 2 ms).
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
        up, down, taps = self.up, self.down, len(self._h)
        last = len(x) * up - taps  # the last filter start with all its input known
        if last < self._start:
            self._x = x
            return np.zeros(0, dtype=np.float32)
        count = (last - self._start) // down + 1
        out = np.zeros(count, dtype=np.float32)
        term = np.empty((count + up - 1) // up, dtype=np.float32)
        # Output j starts its filter at upsampled sample s = start + j*down and meets input
        # samples only at taps k with (s + k) % up == 0. Outputs j, j+up, j+2*up, ... share that
        # phase and step through the input by `down` samples each.
        h = self._h[::-1]  # the filter as a correlation, as the windows met it
        for first in range(min(up, count)):
            s = self._start + first * down
            phase = -s % up
            base = (s + phase) // up
            outs = out[first::up]
            n = len(outs)
            for m, k in enumerate(range(phase, taps, up)):
                i = base + m
                np.multiply(x[i : i + down * (n - 1) + 1 : down], h[k], out=term[:n])
                outs += term[:n]
        self._start += count * down
        dropped = self._start // up
        self._x = x[dropped:].copy()  # not a view that would keep all of ``x`` alive
        self._start -= dropped * up
        return out

    def outputs_for(self, samples: int) -> int:
        """How many samples the next call returns, given ``samples`` more (the same whether
        they come in one call or several)."""
        if self.up == self.down == 1:
            return samples
        last = (len(self._x) + samples) * self.up - len(self._h)
        return 0 if last < self._start else (last - self._start) // self.down + 1


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

    def samples_for(self, nbytes: int) -> int:
        """How many 16 kHz samples the next ``nbytes`` give, at once or in slices: an append is
        bounded by this before it is decoded."""
        return self._resample.outputs_for(
            (len(self._partial) + nbytes) // SAMPLE_BYTES[self.format]
        )

    def decode_base64(
        self, text: str, score: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> list[Piece]:
        """Decode one append's base64 audio a slice at a time, so that the working memory is a
        slice's whatever the append's size; a slow call, made off the event loop.

        Args:
            text: The append's ``audio``.
            score: Server VAD's scorer, given each slice's samples in order, or None.

        Returns:
            The pieces: each slice's samples, and their frames' speech probabilities when
            ``score`` is given.

        Raises:
            ValueError: ``text`` is not base64 (nothing was decoded: the stream is as it was).
        """
        if len(text) % 4 or not _BASE64.fullmatch(text):
            raise ValueError("not base64")
        # Whole groups of 4 characters (3 bytes), so that each slice decodes on its own.
        step = max(4, int(SLICE_SECONDS * self.rate * SAMPLE_BYTES[self.format]) // 3 * 4)
        pieces = []
        for i in range(0, len(text), step):
            samples = self(binascii.a2b_base64(text[i : i + step]))
            pieces.append(Piece(samples, score(samples) if score is not None else None))
        return pieces


__all__ = [
    "INPUT_RATES",
    "InputDecoder",
    "InputFormat",
    "Piece",
    "Resampler",
    "base64_size",
    "decode_g711",
]
