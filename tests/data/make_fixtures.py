"""Write the derived audio fixtures in this folder from the real speech beside it.

Run once, by hand, after changing this script: ``python tests/data/make_fixtures.py``.
The outputs are committed, so the test suite needs neither this script nor ffmpeg: every
file is encoded with PyAV (which bundles the FFmpeg libraries) or written byte by byte.

Good files re-encode real speech into the containers the server must accept; bad files are
the ways an upload goes wrong, each named for what is wrong with it. ``tests/test_audio.py``
holds the expectations for both.
"""

from __future__ import annotations

import struct
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent

JFK = HERE / "jfk.flac"  # 11.00 s, 44.1 kHz stereo
LEOPARD = HERE / "en_leopard_test.wav"  # 5.86 s, 16 kHz mono


def read_pcm(path: Path, rate: int, layout: str) -> np.ndarray:
    """Decode ``path`` to int16 samples shaped (channels, samples)."""
    resampler = av.AudioResampler(format="s16p", layout=layout, rate=rate)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    return np.concatenate(chunks, axis=1)


def encode(
    path: Path,
    pcm: np.ndarray,
    *,
    rate: int,
    layout: str,
    codec: str,
    container_format: str | None = None,
    bit_rate: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    block: int = 4096,
) -> None:
    """Encode int16 planar ``pcm`` (channels, samples) into ``path``."""
    with av.open(
        str(path), mode="w", format=container_format, options=container_options or {}
    ) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options=options or {})
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        for start in range(0, pcm.shape[1], block):
            chunk = np.ascontiguousarray(pcm[:, start : start + block])
            frame = av.AudioFrame.from_ndarray(chunk, format="s16p", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    """Write int16 planar ``pcm`` as a plain PCM WAV with the standard library."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.T.astype("<i2").tobytes())


def wav_header(*, rate: int, channels: int, data_bytes: int) -> bytes:
    """A canonical 44-byte PCM WAV header that announces ``data_bytes`` of samples."""
    block_align = channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block_align, block_align, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def make_good() -> None:
    jfk = read_pcm(JFK, 48000, "stereo")
    jfk_44k = read_pcm(JFK, 44100, "stereo")
    jfk_mono = read_pcm(JFK, 16000, "mono")
    encode(HERE / "jfk.webm", jfk, rate=48000, layout="stereo", codec="libopus", bit_rate=32000)
    encode(
        HERE / "jfk.m4a",
        jfk_44k,
        rate=44100,
        layout="stereo",
        codec="aac",
        bit_rate=48000,
        container_format="ipod",
    )
    encode(HERE / "jfk.mp4", jfk_mono, rate=16000, layout="mono", codec="aac", bit_rate=32000)
    encode(HERE / "jfk.ogg", jfk_44k, rate=44100, layout="stereo", codec="vorbis", bit_rate=48000)
    encode(
        HERE / "jfk.mp3", jfk_44k, rate=44100, layout="stereo", codec="libmp3lame", bit_rate=48000
    )
    # MPEG-1 Layer II, once in an MPEG program stream (.mpeg) and once bare (.mpga).
    encode(
        HERE / "jfk.mpeg",
        jfk_mono,
        rate=16000,
        layout="mono",
        codec="mp2",
        bit_rate=32000,
        container_format="mpeg",
    )
    encode(
        HERE / "jfk.mpga",
        jfk_mono,
        rate=16000,
        layout="mono",
        codec="mp2",
        bit_rate=32000,
        container_format="mp2",
    )

    # A variable-bit-rate MP3 with no Xing/Info frame (as LAME writes to a pipe): FFmpeg guesses
    # its length from the first frame's bit rate, 8 kb/s here, and overestimates it twice over.
    # One second of silence at 8 kb/s, then the speech at 64 kb/s.
    no_xing = {"write_xing": "0", "id3v2_version": "0"}
    parts = []
    for pcm, bit_rate in ((np.zeros((1, 16000), dtype=np.int16), 8000), (jfk_mono, 64000)):
        part = HERE / "_part.mp3"
        encode(
            part,
            pcm,
            rate=16000,
            layout="mono",
            codec="libmp3lame",
            bit_rate=bit_rate,
            container_options=no_xing,
        )
        parts.append(part.read_bytes())
        part.unlink()
    (HERE / "jfk_vbr_no_xing.mp3").write_bytes(b"".join(parts))

    leopard = read_pcm(LEOPARD, 16000, "mono")
    write_wav(HERE / "en_leopard_test_8k.wav", read_pcm(LEOPARD, 8000, "mono"), 8000)
    # 5.1 (FL FR FC LFE BL BR): the same speech at a different gain in each channel, silent
    # in LFE, which FFmpeg's downmix leaves out anyway.
    three_s = leopard[:, : 3 * 16000].astype(np.float32)
    gains = np.array([1.0, 0.8, 0.6, 0.0, 0.4, 0.2], dtype=np.float32)[:, None]
    six = (three_s * gains).astype(np.int16)
    encode(HERE / "en_leopard_test_6ch.wav", six, rate=16000, layout="5.1", codec="pcm_s16le")
    write_wav(HERE / "one_sample.wav", leopard[:, 16000:16001], 16000)


def make_bad() -> None:
    (HERE / "empty_upload.wav").write_bytes(b"")
    (HERE / "not_audio.mp3").write_bytes((HERE / "jfk.txt").read_bytes() * 20)
    rng = np.random.default_rng(20240611)
    (HERE / "garbage.wav").write_bytes(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    write_wav(HERE / "zero_seconds.wav", np.zeros((1, 0), dtype=np.int16), 16000)

    # A container with a video stream and no audio.
    with av.open(str(HERE / "video_only.mp4"), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(10):
            image = np.full((32, 32, 3), i * 20, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)

    # Truncated uploads: the header announces all 5.86 s, the bytes hold about 40 % of it.
    leopard = read_pcm(LEOPARD, 16000, "mono")
    full_mp3 = HERE / "_full.mp3"
    full_flac = HERE / "_full.flac"
    encode(full_mp3, leopard, rate=16000, layout="mono", codec="libmp3lame", bit_rate=64000)
    encode(full_flac, leopard, rate=16000, layout="mono", codec="flac")
    for full, name in ((full_mp3, "mp3"), (full_flac, "flac"), (LEOPARD, "wav")):
        data = full.read_bytes()
        (HERE / f"en_leopard_test_truncated.{name}").write_bytes(data[: len(data) * 4 // 10])
    full_mp3.unlink()
    full_flac.unlink()

    # A header that promises 90 minutes of 16 kHz mono and no samples at all.
    claimed = wav_header(rate=16000, channels=1, data_bytes=90 * 60 * 16000 * 2)
    (HERE / "header_claims_90min.wav").write_bytes(claimed)

    # Decompression bomb: three hours of digital silence in a few kilobytes of FLAC.
    silence = np.zeros((1, 3 * 3600 * 16000), dtype=np.int16)
    encode(
        HERE / "silence_3h.flac",
        silence,
        rate=16000,
        layout="mono",
        codec="flac",
        options={"frame_size": "65535"},
        block=65535,
    )


if __name__ == "__main__":
    make_good()
    make_bad()
    for path in sorted(HERE.iterdir()):
        print(f"{path.stat().st_size:>10}  {path.name}")
