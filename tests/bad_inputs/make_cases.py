"""Write the broken audio files of the bad-input corpus from the real clips in ``tests/data``.

Run once, by hand, after changing this script: ``python tests/bad_inputs/make_cases.py``.
The outputs are committed beside it, so the test suite needs neither this script nor ffmpeg.
Every file is cut, patched or written byte by byte from a known-good clip (or encoded with
PyAV, which bundles the FFmpeg libraries), and each is named for what is wrong with it.
``cases.json`` says what the server must answer for each one.
"""

from __future__ import annotations

import io
import struct
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
SEED = 20250611


def _cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def wav_header(
    *,
    rate: int,
    channels: int,
    data_bytes: int,
    bits: int = 16,
    codec: int = 1,
) -> bytes:
    """A canonical 44-byte WAV header (``codec`` 1 is PCM, 3 is IEEE float)."""
    block_align = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", (36 + data_bytes) & 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, codec, channels, rate, rate * block_align, block_align, bits)
        + b"data"
        + struct.pack("<I", data_bytes & 0xFFFFFFFF)
    )


def leopard_pcm() -> bytes:
    """The 5.86 s leopard clip as 16 kHz mono int16 little-endian samples."""
    with wave.open(str(DATA / "en_leopard_test.wav"), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return w.readframes(w.getnframes())


def flac_bytes(pcm: bytes, rate: int = 16000) -> bytes:
    """Mono int16 ``pcm`` encoded as flac with PyAV, in memory."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16p", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def flac_claiming(total_samples: int, data: bytes) -> bytes:
    """``data`` (a flac) with STREAMINFO's 36-bit total-samples field set to ``total_samples``.

    STREAMINFO starts after ``fLaC`` and a 4-byte block header; total samples are the low 36
    bits of its bytes 10..17 (after min/max block size and frame size, sample rate, channels and
    bits per sample). The MD5 that follows is left as it is; FFmpeg does not check it.
    """
    assert data[:4] == b"fLaC"
    info = bytearray(data)
    start = 8 + 10
    packed = int.from_bytes(info[start : start + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | (total_samples & ((1 << 36) - 1))
    info[start : start + 8] = packed.to_bytes(8, "big")
    return bytes(info)


def make() -> dict[str, bytes]:
    rng = np.random.default_rng(SEED)
    jfk_mp3 = (DATA / "jfk.mp3").read_bytes()
    jfk_webm = (DATA / "jfk.webm").read_bytes()
    jfk_m4a = (DATA / "jfk.m4a").read_bytes()
    jfk_ogg = (DATA / "jfk.ogg").read_bytes()
    pcm = leopard_pcm()
    one_second = pcm[: 16000 * 2]  # enough for a decoder to choke on, small to commit
    three_seconds = pcm[: 3 * 16000 * 2]
    out: dict[str, bytes] = {}

    # Truncated: the container's header promises 11 s, the bytes hold a fraction of it.
    out["jfk_first_1k.mp3"] = jfk_mp3[:1024]
    out["jfk_truncated_40pct.webm"] = _cut(jfk_webm, 0.4)
    out["jfk_ebml_header_only.webm"] = jfk_webm[:200]
    out["jfk_truncated_40pct.ogg"] = _cut(jfk_ogg, 0.4)
    # The ipod muxer writes moov after mdat: cut before it, nothing says what the samples are.
    moov = jfk_m4a.find(b"moov")
    assert moov > len(jfk_m4a) // 2, "jfk.m4a no longer has its moov atom at the end"
    out["jfk_no_moov.m4a"] = jfk_m4a[: moov - 8]

    # Corrupt: the bytes are all there but some are wrong.
    middle = bytearray(jfk_mp3)
    lo, hi = len(middle) * 3 // 10, len(middle) * 6 // 10
    middle[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    out["jfk_random_middle.mp3"] = bytes(middle)
    zeroed = bytearray(flac_bytes(one_second))
    zeroed[8:42] = bytes(34)  # STREAMINFO: rate, channels, bits per sample all zero
    out["jfk_zeroed_streaminfo.flac"] = bytes(zeroed)
    out["flac_magic_then_garbage.flac"] = b"fLaC" + rng.integers(0, 256, 4096, np.uint8).tobytes()
    out["id3_tag_only.mp3"] = b"ID3\x04\x00\x00\x00\x00\x00\x00"
    for name, header in (
        ("riff_unknown_codec", wav_header(rate=16000, channels=1, data_bytes=32000, codec=0x1234)),
        ("wav_zero_sample_rate", wav_header(rate=0, channels=1, data_bytes=32000)),
        ("wav_zero_channels", wav_header(rate=16000, channels=0, data_bytes=32000)),
        ("wav_4096_channels", wav_header(rate=16000, channels=4096, data_bytes=32000)),
    ):
        out[f"{name}.wav"] = header + one_second

    # Odd but valid: these must decode and transcribe.
    out["wav_streaming_size_ffffffff.wav"] = (
        wav_header(rate=16000, channels=1, data_bytes=0xFFFFFFFF) + pcm
    )
    out["wav_odd_trailing_byte.wav"] = (
        wav_header(rate=16000, channels=1, data_bytes=len(pcm) + 1) + pcm + b"\x01"
    )
    samples = np.frombuffer(three_seconds, dtype="<i2").astype(np.float32) / 32768.0
    samples[::50] = np.nan
    samples[25::50] = np.inf
    out["float_wav_nan_inf.wav"] = (
        wav_header(rate=16000, channels=1, data_bytes=samples.nbytes, bits=32, codec=3)
        + samples.astype("<f4").tobytes()
    )
    loud = np.frombuffer(three_seconds, dtype="<i2").astype(np.float32) * np.float32(1e30)
    out["float_wav_1e30_amplitude.wav"] = (
        wav_header(rate=16000, channels=1, data_bytes=loud.nbytes, bits=32, codec=3)
        + loud.astype("<f4").tobytes()
    )

    # Headers that promise hours: a few hundred bytes must not be taken at their word.
    out["flac_header_claims_10h.flac"] = flac_claiming(10 * 3600 * 16000, flac_bytes(bytes(6400)))
    out["wav_header_claims_2h30_8khz.wav"] = wav_header(
        rate=8000, channels=1, data_bytes=int(2.5 * 3600) * 8000 * 2
    )
    return out


def main() -> None:
    for name, data in sorted(make().items()):
        (HERE / name).write_bytes(data)
        print(f"{name:40} {len(data):>8} bytes")


if __name__ == "__main__":
    main()
