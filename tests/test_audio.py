"""server/audio/decode.py on real speech: decoding every supported container, refusing every kind
of bad upload with its own code, and cutting long audio at the pauses between sentences.

The derived fixtures (other containers, truncated files, the decompression bomb, ...) come
from ``tests/data/make_fixtures.py``; the real recordings and their durations from
``tests/data/manifest.csv``.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from av.audio.plane import AudioPlane

import server.audio.decode as audio_module
from server.audio.decode import SUPPORTED_FORMATS, DecodedAudio, decode_audio
from server.audio.pieces import AudioSpan, pcm_slice, split_on_silence
from server.errors import AudioError, InvalidRequestError
from tests.media import Media, signal

DATA = Path(__file__).parent / "data"
RATE = 16000
LIMIT = 2 * 3600.0

with (DATA / "manifest.csv").open(newline="", encoding="utf-8") as f:
    MANIFEST = {row["file"]: row for row in csv.DictReader(f)}

LJ = "en_ljspeech_LJ001-0001_to_0032_concat.flac"


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def decode(name: str, max_duration: float = LIMIT) -> DecodedAudio:
    return decode_audio(read(name), max_duration=max_duration)


def envelope(samples: np.ndarray, rate: int = RATE, hop_s: float = 0.05) -> np.ndarray:
    """RMS per 50 ms: compares two encodings of one recording without caring about phase."""
    hop = int(rate * hop_s)
    frames = samples[: len(samples) // hop * hop].astype(np.float64).reshape(-1, hop)
    return np.sqrt((frames**2).mean(axis=1))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


# ---- good files -------------------------------------------------------------------------------

REAL_FILES = [
    "jfk.flac",
    "en_librispeech_61-70968-0000.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "zh_aishell_BAC009S0724W0121.wav",
    "ja_commonvoice_24511055.mp3",
    "es_mls_13697_11991_000000.opus",
    "stereo_diarization.wav",
    "hotwords.mp3",
    LJ,
]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_recordings_decode_to_their_manifest_duration(name: str) -> None:
    row = MANIFEST[name]
    audio = decode(name)

    assert audio.samples.dtype == np.float32
    assert audio.samples.ndim == 1
    assert len(audio.samples) == pytest.approx(audio.duration * RATE, abs=1)
    # ffprobe's durations include MP3 padding that the decoder trims: allow 60 ms.
    assert audio.duration == pytest.approx(float(row["duration_s"]), abs=0.06)
    assert audio.source_rate == int(row["sample_rate"])
    assert audio.source_channels == int(row["channels"])
    rms = float(np.sqrt(np.mean(audio.samples.astype(np.float64) ** 2)))
    assert 0.005 < rms < 0.5, "speech, neither silence nor noise at full scale"
    assert np.abs(audio.samples).max() <= 1.0


# (derived file, recording it was made from, FFmpeg's container name, rate, channels)
DERIVED_FILES = [
    ("jfk.webm", "jfk.flac", "matroska,webm", 48000, 2),
    ("jfk.m4a", "jfk.flac", "mov,mp4,m4a,3gp,3g2,mj2", 44100, 2),
    ("jfk.mp4", "jfk.flac", "mov,mp4,m4a,3gp,3g2,mj2", 16000, 1),
    ("jfk.ogg", "jfk.flac", "ogg", 44100, 2),
    ("jfk.mp3", "jfk.flac", "mp3", 44100, 2),
    ("jfk.mpeg", "jfk.flac", "mpeg", 16000, 1),
    ("jfk.mpga", "jfk.flac", "mp3", 16000, 1),
    ("en_leopard_test_8k.wav", "en_leopard_test.wav", "wav", 8000, 1),
]


@pytest.mark.parametrize(("name", "source", "format_name", "rate", "channels"), DERIVED_FILES)
def test_every_container_decodes_to_the_recording_it_holds(
    name: str, source: str, format_name: str, rate: int, channels: int
) -> None:
    audio = decode(name)
    original = decode(source)

    assert audio.format_name == format_name
    assert (audio.source_rate, audio.source_channels) == (rate, channels)
    assert audio.duration == pytest.approx(float(MANIFEST[source]["duration_s"]), abs=0.05)
    # Lossy codecs change the waveform, not its loudness over time. MP2 keeps its 30 ms decoder
    # delay (it has no gapless header), hence the search over small lags.
    a, b = envelope(audio.samples), envelope(original.samples)
    best = max(correlation(a[lag:], b) for lag in range(3))
    assert best > 0.9


def test_formats_named_in_the_error_message_cover_the_openai_list() -> None:
    assert set(SUPPORTED_FORMATS) >= {"flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav"}
    assert {"webm", "opus", "oga"} <= set(SUPPORTED_FORMATS)


def read_wav_channels(name: str) -> np.ndarray:
    with wave.open(str(DATA / name)) as w:
        assert w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm.reshape(-1, w.getnchannels()).T.astype(np.float64) / 32768.0


def test_stereo_is_mixed_down_to_the_mean_of_both_channels() -> None:
    left, right = read_wav_channels("stereo_diarization.wav")
    mono = decode("stereo_diarization.wav").samples

    # The two channels hold different speakers, so neither alone explains the mix.
    assert correlation(mono, left) < 0.9
    assert correlation(mono, right) < 0.9
    np.testing.assert_allclose(mono, (left + right) / 2, atol=2 / 32768)


def test_six_channels_are_mixed_down_to_the_speech_they_carry() -> None:
    audio = decode("en_leopard_test_6ch.wav")
    speech = decode("en_leopard_test.wav").samples[: 3 * RATE]

    assert (audio.source_rate, audio.source_channels) == (RATE, 6)
    assert audio.duration == pytest.approx(3.0, abs=1e-3)
    assert correlation(audio.samples, speech) > 0.99


def test_8khz_audio_is_resampled_to_16khz() -> None:
    audio = decode("en_leopard_test_8k.wav")
    speech = decode("en_leopard_test.wav").samples

    assert len(audio.samples) == pytest.approx(len(speech), abs=2)
    assert correlation(audio.samples, speech) > 0.9  # only what lies above 4 kHz is gone


def test_a_single_sample_is_audio() -> None:
    audio = decode("one_sample.wav")

    assert len(audio.samples) == 1
    assert audio.duration == pytest.approx(1 / RATE)


def test_decoding_depends_on_the_bytes_not_the_file_name(tmp_path: Path) -> None:
    """Clients such as the openai SDK send files named ``upload``; a wrong suffix is harmless."""
    for name in ("jfk.webm", "jfk.m4a", "ja_commonvoice_24511055.mp3"):
        reference = decode(name)
        for alias in ("upload", "audio.wav", "notes.txt"):
            (tmp_path / alias).write_bytes(read(name))
            audio = decode_audio((tmp_path / alias).read_bytes(), max_duration=LIMIT)
            assert audio.format_name == reference.format_name
            np.testing.assert_array_equal(audio.samples, reference.samples)


def test_an_mp3_without_a_length_header_is_not_called_truncated() -> None:
    # FFmpeg guesses 22.7 s from the first frame's bit rate; only 12 s are there, and that is
    # not truncation: nothing in the file promised more.
    audio = decode("jfk_vbr_no_xing.mp3")

    assert audio.duration == pytest.approx(1.0 + float(MANIFEST["jfk.flac"]["duration_s"]), abs=0.2)


def test_a_stream_that_changes_rate_and_channels_midway_decodes_whole() -> None:
    # Two MP3s back to back: 44.1 kHz stereo, then 32 kHz mono.
    first, second = "jfk.mp3", "ja_commonvoice_24511055.mp3"
    audio = decode_audio(read(first) + read(second), max_duration=LIMIT)

    expected = float(MANIFEST["jfk.flac"]["duration_s"]) + float(MANIFEST[second]["duration_s"])
    assert audio.duration == pytest.approx(expected, abs=0.1)
    assert (audio.source_rate, audio.source_channels) == (44100, 2)


# ---- every channel count, every sample format -------------------------------------------------

# Issue 21: reading one channel (as diarization's channel measurement does) of a file with 8 or
# more channels segfaulted the server, inside PyAV's AudioFrame.to_ndarray on planar frames.
_READ_EVERY_CHANNEL = """
import sys
import numpy as np
from server.audio.decode import ALL_CHANNELS, AudioStream
from tests.media import Media, signal
wide = {"mapping_family": "255"} if sys.argv[2] == "libopus" else {}
media = Media(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "", options=wide,
              separate=True)
data = media.encode()
with AudioStream(data, max_duration=60, channel=ALL_CHANNELS) as stream:
    every = stream.read(10**7)
assert every.shape[1] == media.channels, every.shape
for c in range(media.channels):
    with AudioStream(data, max_duration=60, channel=c) as stream:
        one = stream.read(10**7)
    assert np.array_equal(one, every[:, c]), c
print("ok")
"""


@pytest.mark.parametrize(
    ("container", "codec", "channels", "rate"),
    [
        ("wav", "pcm_s16le", 8, 16000),
        ("wav", "pcm_f32le", 9, 22050),
        ("matroska", "libopus", 16, 48000),
        ("wav", "pcm_s16le", 64, 8000),
    ],
)
def test_any_channel_of_a_wide_file_reads_without_crashing(
    container: str, codec: str, channels: int, rate: int
) -> None:
    """In a process of its own, so that a crash fails this test instead of ending the run."""
    out = subprocess.run(
        [sys.executable, "-c", _READ_EVERY_CHANNEL, container, codec, str(channels), str(rate)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


_FORMATS = ["u8", "u8p", "s16", "s16p", "s32", "s32p", "s64", "s64p", "flt", "fltp", "dbl", "dblp"]


@pytest.mark.parametrize("channels", [1, 2, 7, 8, 9, 64])
@pytest.mark.parametrize("fmt", _FORMATS)
def test_every_sample_format_and_channel_count_converts_exactly(fmt: str, channels: int) -> None:
    """Frames of every sample format FFmpeg has, planar and packed, come out of the
    resampler as packed 16-bit, read with explicit sizes: each channel keeps its own values."""
    n = 480
    layout = "mono" if channels == 1 else "stereo" if channels == 2 else f"{channels} channels"
    frame = av.AudioFrame(format=fmt, layout=layout, samples=n)
    frame.sample_rate = 16000
    # A level of its own per channel (3c mod 100 differs for every c < 100), within 16 bits.
    values = ((np.arange(channels)[:, None] * 3) % 100 - 50 + np.arange(n)[None, :] % 20) * 256
    dtype = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64}
    dtype |= {"flt": np.float32, "dbl": np.float64}
    kind = np.dtype(dtype[fmt.rstrip("p")])
    if kind == np.uint8:
        typed = (values // 256 + 128).astype(np.uint8)
    elif kind.kind == "f":
        typed = (values / 32768).astype(kind)
    else:
        typed = (values * (1 << (8 * kind.itemsize - 16))).astype(kind)
    # Filled plane by plane through the buffer protocol, by index (never frame.planes).
    rows = typed if frame.format.is_planar else typed.T.reshape(1, -1)
    for i, row in enumerate(rows):
        np.frombuffer(memoryview(AudioPlane(frame, i)), dtype=kind, count=row.size)[:] = row
    resampler = audio_module._resampler(frame.layout, 16000)
    out = [audio_module._samples(f) for f in resampler.resample(frame) + resampler.resample(None)]
    got = np.concatenate(out)
    assert got.shape == (n, channels)
    want = (values // 256 * 256).T if kind == np.uint8 else values.T
    assert np.abs(got.astype(np.int64) - want).max() <= (256 if kind == np.uint8 else 1)


def test_channels_in_no_known_order_are_mixed_to_their_mean() -> None:
    """FFmpeg mixes down a layout only where it can name the channels (for "16 channels" it
    guesses a standard one); 64 channels are averaged here instead of refused (they were a
    400 before)."""
    media = Media("wav", "pcm_s16le", 64, 16000, "s16", seconds=1.0)
    audio = decode_audio(media.encode(), max_duration=LIMIT)
    want = (signal(media).T * 32767).astype(np.int16).mean(axis=1) / 32768
    assert len(audio.samples) == len(want)
    assert np.abs(audio.samples - want).max() < 2e-4


# ---- bad files --------------------------------------------------------------------------------

# (fixture, max_duration, expected code, words the message must contain)
BAD_FILES = [
    ("empty_upload.wav", LIMIT, "empty_file", ["empty", "0 bytes"]),
    ("not_audio.mp3", LIMIT, "invalid_audio", ["decoded as audio", "supported formats: flac"]),
    ("garbage.wav", LIMIT, "invalid_audio", ["decoded as audio", "supported formats"]),
    ("video_only.mp4", LIMIT, "no_audio_stream", ["no audio track", "video"]),
    ("zero_seconds.wav", LIMIT, "empty_audio", ["no audio samples"]),
    ("en_leopard_test_truncated.mp3", LIMIT, "truncated_audio", ["declares 5.9 s", "only 2.3 s"]),
    ("en_leopard_test_truncated.flac", LIMIT, "truncated_audio", ["declares 5.9 s", "only 2.1 s"]),
    ("en_leopard_test_truncated.wav", LIMIT, "truncated_audio", ["declares 5.9 s", "only 2.3 s"]),
    ("header_claims_90min.wav", LIMIT, "truncated_audio", ["declares 5400 s", "only 0.0 s"]),
    # Over the limit, the header's claim is turned away before anything is decoded.
    ("header_claims_90min.wav", 3600.0, "audio_too_long", ["declares 5400 s", "limit of 3600 s"]),
    ("silence_3h.flac", LIMIT, "audio_too_long", ["declares 10800 s", "limit of 7200 s"]),
    ("jfk.flac", 5.0, "audio_too_long", ["declares 11.0 s", "limit of 5.0 s"]),
    # Near the limit, decoding runs and stops as soon as it passes it.
    ("jfk.flac", 10.5, "audio_too_long", ["runs past the limit of 10.5 s"]),
]


@pytest.mark.parametrize(
    ("name", "max_duration", "code", "words"),
    BAD_FILES,
    ids=[f"{name}-{code}" for name, _, code, _ in BAD_FILES],
)
def test_bad_uploads_are_400s_with_a_code_that_says_why(
    name: str, max_duration: float, code: str, words: list[str]
) -> None:
    with pytest.raises(AudioError) as caught:
        decode(name, max_duration=max_duration)

    err = caught.value
    assert isinstance(err, InvalidRequestError)
    assert err.status == 400
    assert err.param == "file"
    assert err.code == code
    for word in words:
        assert word in err.message
    assert err.body()["error"]["code"] == code


def test_pyav_errors_are_chained_not_leaked() -> None:
    with pytest.raises(AudioError) as caught:
        decode("garbage.wav")
    assert type(caught.value.__cause__).__module__.startswith("av")


def test_a_decompression_bomb_stops_at_the_limit_while_decoding() -> None:
    # 3 hours of silence in 46 kB. With a limit just under its header's claim the header check
    # lets it through, and decoding has to stop it.
    assert len(read("silence_3h.flac")) < 100_000
    with pytest.raises(AudioError) as caught:
        decode("silence_3h.flac", max_duration=10_000.0)
    assert caught.value.code == "audio_too_long"
    assert "runs past" in caught.value.message


@pytest.mark.parametrize(
    "data",
    [
        b"1\n00:00:01,000 --> 00:00:02,000\nHello\n\n",  # SubRip subtitles
        b"WEBVTT\n\n00:01.000 --> 00:02.000\nhi\n",
        # Playlists and concat lists name other files: FFmpeg must never follow them.
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n" + str(DATA / "jfk.flac").encode(),
        b"ffconcat version 1.0\nfile '" + str(DATA / "jfk.flac").encode() + b"'\n",
        b"\x00" * 1000,
    ],
    ids=["srt", "webvtt", "hls", "ffconcat", "zeros"],
)
def test_formats_that_are_not_audio_containers_are_refused(data: bytes) -> None:
    with pytest.raises(AudioError) as caught:
        decode_audio(data, max_duration=LIMIT)
    assert caught.value.code == "invalid_audio"


def test_audio_in_a_codec_without_a_decoder_is_refused() -> None:
    header = bytearray(read("zero_seconds.wav")[:44])
    header[20:22] = (0x9999).to_bytes(2, "little")  # WAVE format tag no decoder knows
    header[40:44] = (32000).to_bytes(4, "little")
    with pytest.raises(AudioError) as caught:
        decode_audio(bytes(header) + bytes(32000), max_duration=LIMIT)
    assert caught.value.code == "invalid_audio"
    assert "codec" in caught.value.message


@pytest.mark.parametrize("name", [name for name, *_ in DERIVED_FILES] + ["video_only.mp4"])
def test_damaged_files_decode_or_fail_with_an_audio_error(name: str) -> None:
    """Flipped bytes, overwritten stretches, cut tails: never anything but an AudioError."""
    rng = np.random.default_rng(sum(name.encode()))
    original = np.frombuffer(read(name), dtype=np.uint8)
    for _ in range(25):
        data = original.copy()
        damage = rng.integers(3)
        if damage == 0:
            where = rng.integers(len(data), size=rng.integers(1, 50))
            data[where] = rng.integers(256, size=len(where))
        elif damage == 1:
            start = rng.integers(len(data))
            stop = min(len(data), start + rng.integers(1, 5000))
            data[start:stop] = rng.integers(256, size=stop - start)
        else:
            data = data[: rng.integers(len(data))]
        try:
            decode_audio(data.tobytes(), max_duration=60.0)
        except AudioError as err:
            assert err.code in {
                "empty_file",
                "invalid_audio",
                "no_audio_stream",
                "empty_audio",
                "truncated_audio",
                "audio_too_long",
            }


def test_bad_arguments_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        decode_audio(read("jfk.flac"), max_duration=0)
    with pytest.raises(ValueError):
        split_on_silence(np.zeros(10, dtype=np.float32), max_span_s=0)


# ---- split_on_silence -------------------------------------------------------------------------


def assert_tiles(spans: list[AudioSpan], n: int, max_span_s: float) -> None:
    assert spans[0].start == 0
    assert spans[-1].end == n
    for before, after in itertools.pairwise(spans):
        assert before.end == after.start
    for span in spans:
        assert 0 < span.end - span.start <= int(max_span_s * RATE)


@pytest.fixture(scope="module")
def lj_speech() -> np.ndarray:
    return decode(LJ).samples


def sentence_gaps() -> list[tuple[float, float]]:
    path = DATA / "en_ljspeech_LJ001-0001_to_0032_concat.segments.tsv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(float(a["end_s"]), float(b["start_s"])) for a, b in itertools.pairwise(rows)]


@pytest.mark.parametrize("max_span_s", [30.0, 45.0, 60.0, 120.0])
def test_long_speech_is_cut_between_sentences(lj_speech: np.ndarray, max_span_s: float) -> None:
    spans = split_on_silence(lj_speech, max_span_s=max_span_s)
    gaps = sentence_gaps()

    assert_tiles(spans, len(lj_speech), max_span_s)
    assert len(spans) >= int(len(lj_speech) / RATE / max_span_s) + 1
    for span in spans[:-1]:
        cut = span.end_s
        inside = [gap for gap in gaps if gap[0] - 0.15 <= cut <= gap[1] + 0.15]
        assert inside, f"cut at {cut:.2f} s is not between two sentences"


@pytest.mark.parametrize("max_span_s", [0.05, 1.0, 7.0, 20.0, 100.0])
def test_spans_tile_the_audio_whatever_the_limit(lj_speech: np.ndarray, max_span_s: float) -> None:
    samples = lj_speech[: 40 * RATE]
    spans = split_on_silence(samples, max_span_s=max_span_s)

    assert_tiles(spans, len(samples), max_span_s)
    np.testing.assert_array_equal(np.concatenate([pcm_slice(samples, s) for s in spans]), samples)


def test_audio_within_the_limit_is_one_span(lj_speech: np.ndarray) -> None:
    samples = lj_speech[: 10 * RATE]

    assert split_on_silence(samples, max_span_s=10.0) == [AudioSpan(0, len(samples))]
    assert split_on_silence(samples, max_span_s=30.0) == [AudioSpan(0, len(samples))]


def test_span_times_are_in_seconds() -> None:
    span = AudioSpan(8000, 40000)
    assert (span.start_s, span.end_s, span.duration_s) == (0.5, 2.5, 2.0)


def test_without_speech_the_cut_goes_to_the_quietest_place() -> None:
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(30 * RATE)).astype(np.float32)
    noise[int(17.0 * RATE) : int(17.3 * RATE)] = 0.0  # a hush in the last third of 20 s
    spans = split_on_silence(noise, max_span_s=20.0)

    assert len(spans) == 2
    assert 17.0 <= spans[0].end_s <= 17.3


def test_at_another_rate_the_cut_goes_to_the_quietest_place(lj_speech: np.ndarray) -> None:
    # No VAD at 8 kHz: the energy fallback alone still finds the gaps between sentences' words.
    samples = lj_speech[::2][: 60 * 8000]
    spans = split_on_silence(samples, max_span_s=25.0, sample_rate=8000)

    assert spans[0].start == 0 and spans[-1].end == len(samples)
    assert all(s.sample_rate == 8000 and s.duration_s <= 25.0 for s in spans)
    for span in spans[:-1]:
        window = samples[span.end - 400 : span.end + 400].astype(np.float64)
        assert np.sqrt(np.mean(window**2)) < 0.01, f"cut at {span.end_s:.2f} s is not quiet"


# ---- performance smoke ------------------------------------------------------------------------


def test_two_hours_decode_and_split(lj_speech: np.ndarray, capsys: pytest.CaptureFixture) -> None:
    """Two hours of real speech, tiled: completes, and prints how long it took."""
    pcm = np.tile((lj_speech * 32767).astype("<i2"), int(np.ceil(7200 * RATE / len(lj_speech))))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm[: 7200 * RATE].tobytes())
    del pcm
    data = buffer.getvalue()
    del buffer

    started = time.perf_counter()
    audio = decode_audio(data, max_duration=3 * 3600.0)
    timings = [("decode 2 h wav", time.perf_counter() - started)]
    del data
    assert audio.duration == pytest.approx(7200.0, abs=0.01)

    for max_span_s in (30.0, 120.0, 600.0, 1800.0):
        started = time.perf_counter()
        spans = split_on_silence(audio.samples, max_span_s=max_span_s)
        timings.append(
            (f"split 2 h into <= {max_span_s:.0f} s spans", time.perf_counter() - started)
        )
        assert_tiles(spans, len(audio.samples), max_span_s)

    with capsys.disabled():
        print()
        for what, seconds in timings:
            print(f"    {what:<34} {seconds:6.2f} s")
