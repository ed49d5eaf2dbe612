"""Audio files made at test time with PyAV's own FFmpeg: any container, codec, channel count,
sample format and rate, a second or two long.

Every channel carries speech (the start of JFK's inaugural address), each at its own level
with a tone of its own, so that diarization takes the channels for one recording and mixes
them; with ``separate``, channel 0 alone speaks and the others carry tones under a little
noise, which diarization by channel takes for separate speakers. Encoding uses only PyAV calls that are safe for every channel count:
frames are built packed (one plane) and the encoder converts them to its own format.
"""

from __future__ import annotations

import fractions
import io
from dataclasses import dataclass, field
from functools import cache

import av
import numpy as np

from tests.conftest import DATA

#: FFmpeg names the layouts it knows; wider files have channels in no particular order.
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 6: "5.1", 8: "7.1"}


def layout(channels: int) -> str:
    return _LAYOUTS.get(channels, f"{channels} channels")


@dataclass(frozen=True)
class Media:
    """One file to make.

    Attributes:
        container: FFmpeg's muxer (``wav``, ``flac``, ``ogg``, ``webm``, ``mp3``, ``ipod`` for
            m4a, ``mov``, ``matroska``).
        codec: The encoder.
        channels: Channel count.
        rate: Sample rate, in Hz.
        decoded: The sample format FFmpeg's decoder gives for it (what the server reads).
        sample_format: The encoder's input format, where it has several (s16/s32 FLAC).
        seconds: Length.
        options: Encoder options.
        separate: Speech on channel 0 only (see the module doc).
        noise: Independent white noise on every channel instead of speech and tones.
    """

    container: str
    codec: str
    channels: int
    rate: int
    decoded: str
    sample_format: str | None = None
    seconds: float = 1.5
    options: dict[str, str] = field(default_factory=dict)
    separate: bool = False
    noise: bool = False

    @property
    def name(self) -> str:
        what = "-noise" if self.noise else "-separate" if self.separate else ""
        return f"{self.container}-{self.codec}-{self.channels}ch-{self.decoded}-{self.rate}{what}"

    def encode(self) -> bytes:
        return encode(self, signal(self))


@cache
def _speech() -> np.ndarray:
    """JFK's first seconds at 16 kHz, mono."""
    with av.open(str(DATA / "jfk.flac")) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        parts = []
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                parts.append(np.frombuffer(memoryview(out.planes[0]), np.float32, out.samples))
    return np.concatenate(parts)


def signal(media: Media) -> np.ndarray:
    """``(channels, samples)`` float64 in [-1, 1]."""
    n = int(media.seconds * media.rate)
    rng = np.random.default_rng(media.channels * 1000 + media.rate)
    if media.noise:
        return rng.uniform(-0.5, 0.5, size=(media.channels, n))
    t = np.arange(n) / media.rate
    speech = _speech()
    channel0 = np.interp(t, np.arange(len(speech)) / 16000, speech)
    rows = [channel0]
    for c in range(1, media.channels):
        tone = 0.05 * np.sin(2 * np.pi * (180 + 37 * c) * t)
        if media.separate:
            rows.append(2 * tone + 0.01 * rng.standard_normal(n))
        else:
            rows.append(channel0 * (1 - c / (2 * media.channels)) + tone)
    return np.clip(np.stack(rows), -1, 1)


def encode(media: Media, samples: np.ndarray) -> bytes:
    """``samples`` (``(channels, n)`` in [-1, 1]) encoded as ``media`` says."""
    buf = io.BytesIO()
    name = layout(media.channels)
    with av.open(buf, "w", format=media.container) as out:
        stream = out.add_stream(media.codec, rate=media.rate, layout=name, options=media.options)
        if media.sample_format:
            stream.format = media.sample_format
        step = stream.codec_context.frame_size or 1024
        interleaved = (samples.T * 32767).astype(np.int16)  # packed s16: one plane
        for pos in range(0, interleaved.shape[0], step):
            block = np.ascontiguousarray(interleaved[pos : pos + step]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=name)
            frame.sample_rate = media.rate
            frame.pts = pos
            frame.time_base = fractions.Fraction(1, media.rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def decoded_format(data: bytes) -> tuple[str, int, int]:
    """The sample format, channels and rate of the first decoded frame (nothing else of it is
    touched, so this is safe for every layout)."""
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            return frame.format.name, frame.layout.nb_channels, frame.sample_rate
    raise ValueError("no audio frame")
