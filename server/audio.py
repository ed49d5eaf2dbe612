"""Uploaded bytes -> 16 kHz mono float32, and cutting long audio into spans at pauses.

Decoding uses PyAV, which bundles the FFmpeg libraries, on the bytes in memory. The container
is recognised by its content alone: clients such as the ``openai`` SDK send files named
``upload``, and no part of a request is ever used as a path. Only the demuxers for the formats
OpenAI's API accepts are enabled, so FFmpeg's playlist and concat readers can never be reached.

Every way an upload can be unusable becomes an :class:`~server.errors.AudioError` (HTTP 400)
with its own ``code``:

=================== ==================================================================
``empty_file``      the upload has no bytes
``invalid_audio``   not a supported container, or nothing in it decodes
``no_audio_stream`` a media container without an audio track (a silent video)
``empty_audio``     the audio track decodes to no samples
``truncated_audio`` the header promises more audio than the bytes hold, or decoding
                    fails part way through
``audio_too_long``  longer than the configured limit (checked against the header before
                    decoding, and again while decoding, which also stops decompression bombs)
=================== ==================================================================
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import av
import numpy as np
from faster_whisper.vad import VadOptions, get_speech_timestamps

from server.errors import AudioError

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "flac",
    "m4a",
    "mp3",
    "mp4",
    "mpeg",
    "mpga",
    "oga",
    "ogg",
    "opus",
    "wav",
    "webm",
)
"""File types the server accepts, as OpenAI's API names them (by extension)."""

# FFmpeg demuxers that read SUPPORTED_FORMATS: "mov" reads mp4/m4a, "matroska" webm, "ogg"
# ogg/oga/opus, "mp3" mp3/mpga (any MPEG audio layer), "mpeg" MPEG program streams, "aac" bare
# ADTS. Probing still looks at every demuxer; one not listed here fails to open.
_DEMUXERS = ("wav", "flac", "mp3", "mov", "ogg", "matroska", "mpeg", "aac")

# Everything PyAV raises: its own FFmpegError tree, plus the ValueError/RuntimeError its Python
# layer raises (for instance when a frame does not match a resampler's setup).
_PYAV_ERRORS = (av.FFmpegError, ValueError, RuntimeError, OSError, EOFError)

# A header duration is trusted as a promise: decoding less than this fraction of it, with more
# than _TRUNCATION_SLACK_S missing, means the upload lost its tail.
_TRUNCATION_RATIO = 0.9
_TRUNCATION_SLACK_S = 0.5
# Reject before decoding only when the header claims this much more than the limit, so that a
# slightly long estimate never turns away audio that is within it.
_DECLARED_TOO_LONG_FACTOR = 1.1

_INT16_SCALE = np.float32(1.0 / 32768.0)


@dataclass(frozen=True, eq=False)  # eq=False: an array has no single truth value
class DecodedAudio:
    """An upload decoded to the rate the model wants.

    Attributes:
        samples: float32 mono samples in [-1, 1); several channels are mixed down to one.
        duration: Length of ``samples`` in seconds.
        format_name: The container FFmpeg recognised, as FFmpeg names it (``"wav"``,
            ``"mov,mp4,m4a,3gp,3g2,mj2"``, ``"matroska,webm"``, ...).
        source_rate: Sample rate of the audio track before resampling, in Hz.
        source_channels: Number of channels in the audio track before mixing down.
    """

    samples: np.ndarray
    duration: float
    format_name: str
    source_rate: int
    source_channels: int


def decode_audio(data: bytes, *, max_duration: float, sample_rate: int = 16000) -> DecodedAudio:
    """Decode an uploaded file to mono float32 at ``sample_rate``.

    Args:
        data: The uploaded bytes. The format is detected from them; no file name is needed.
        max_duration: Longest audio accepted, in seconds.
        sample_rate: Rate of the returned samples, in Hz.

    Returns:
        The samples with their duration and what the source was.

    Raises:
        AudioError: The bytes are not usable audio; ``code`` says why (see the module doc).
        ValueError: ``max_duration`` or ``sample_rate`` is not positive.
    """
    if max_duration <= 0 or sample_rate <= 0:
        raise ValueError(
            f"max_duration and sample_rate must be positive, got {max_duration}, {sample_rate}"
        )
    if not data:
        raise _error("empty_file", "The uploaded file is empty (0 bytes). " + _SEND_AUDIO)

    try:
        container = av.open(
            io.BytesIO(data),
            mode="r",
            options={"format_whitelist": ",".join(_DEMUXERS)},
            metadata_errors="ignore",
        )
    except _PYAV_ERRORS as exc:
        raise _error(
            "invalid_audio", f"The uploaded file could not be decoded as audio. {_SEND_AUDIO}"
        ) from exc

    with container:
        format_name = container.format.name
        if not container.streams.audio:
            kinds = ", ".join(sorted({str(s.type) for s in container.streams})) or "nothing"
            raise _error(
                "no_audio_stream",
                f"The uploaded file is a media container ({format_name}) with no audio track; "
                f"it holds {kinds}. Upload a file with an audio track, or extract the audio first.",
            )
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for this codec
            raise _error(
                "invalid_audio",
                f"The uploaded file ({format_name}) holds audio in a codec the server cannot "
                f"decode. {_SEND_AUDIO}",
            )
        declared = _declared_duration(data, container, stream)
        if declared is not None and declared > max_duration * _DECLARED_TOO_LONG_FACTOR:
            raise _too_long(f"its header declares {_fmt_s(declared)}, over", max_duration)
        decoded = _decode_stream(
            container, stream, sample_rate=sample_rate, max_duration=max_duration
        )

    samples = decoded.samples
    duration = len(samples) / sample_rate
    if decoded.failure is not None and len(samples) == 0:
        raise _error(
            "invalid_audio",
            f"The uploaded file ({format_name}) could not be decoded as audio "
            f"({decoded.failure}). {_SEND_AUDIO}",
        ) from decoded.failure
    if declared is not None and _falls_short(decoded=duration, declared=declared):
        raise _error(
            "truncated_audio",
            f"The uploaded file looks truncated or corrupt: its header declares "
            f"{_fmt_s(declared)} of audio but only {_fmt_s(duration)} could be decoded. "
            "Upload the complete file, or re-encode it.",
        ) from decoded.failure
    if decoded.failure is not None:
        raise _error(
            "truncated_audio",
            f"The uploaded file is truncated or corrupt: decoding stopped after {_fmt_s(duration)} "
            f"({decoded.failure}). Upload the complete file, or re-encode it.",
        ) from decoded.failure
    if len(samples) == 0:
        if decoded.bad_packets:
            raise _error(
                "invalid_audio",
                f"The uploaded file ({format_name}) could not be decoded as audio: none of its "
                f"{decoded.bad_packets} audio packets decoded. {_SEND_AUDIO}",
            )
        raise _error(
            "empty_audio",
            "The uploaded file contains no audio samples (0 seconds). "
            "Upload a recording that is not empty.",
        )
    if decoded.bad_packets:
        logger.warning(
            "skipped %d undecodable packets in a %s upload", decoded.bad_packets, format_name
        )
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "decoded %s: %.2f s, %d Hz x %d channels -> %d samples",
            format_name,
            duration,
            decoded.source_rate,
            decoded.source_channels,
            len(samples),
        )
    return DecodedAudio(
        samples=samples,
        duration=duration,
        format_name=format_name,
        source_rate=decoded.source_rate,
        source_channels=decoded.source_channels,
    )


_SEND_AUDIO = (
    "Upload an audio file in one of the supported formats: " + ", ".join(SUPPORTED_FORMATS) + "."
)


def _error(code: str, message: str) -> AudioError:
    return AudioError(message, code=code, param="file")


def _too_long(what: str, max_duration: float) -> AudioError:
    return _error(
        "audio_too_long",
        f"The uploaded audio is too long: {what} the limit of {_fmt_s(max_duration)}. "
        "Split the recording into shorter files.",
    )


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds:.0f} s ({seconds / 60:.0f} min)"
    return f"{seconds:.0f} s ({seconds / 3600:.1f} h)"


def _falls_short(*, decoded: float, declared: float) -> bool:
    return decoded < _TRUNCATION_RATIO * declared and declared - decoded > _TRUNCATION_SLACK_S


# ---- what the header promises -----------------------------------------------------------------


def _declared_duration(
    data: bytes, container: av.container.InputContainer, stream: av.AudioStream
) -> float | None:
    """Seconds of audio the file's header promises, or None where it promises nothing reliable."""
    name = container.format.name
    if name == "wav":
        # FFmpeg clamps a WAV data chunk to the bytes present, hiding truncation; read the header.
        return _wav_declared_duration(data)
    if name == "mp3" and not _mp3_has_length_header(data):
        # Without a Xing/Info/VBRI frame FFmpeg guesses the length from the first frame's bit
        # rate, which for VBR files can be off several times over.
        return None
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    # The container's duration covers every stream; it speaks for the audio only when alone.
    if container.duration is not None and container.duration > 0 and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


_UNKNOWN_WAV_SIZES = 0x7FFFF000  # streaming writers put 0, 0x7FFFFFFF or 0xFFFFFFFF here


def _wav_declared_duration(data: bytes) -> float | None:
    """Seconds announced by a RIFF/WAVE header's data chunk, or None if it announces none."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    byte_rate = 0
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"fmt " and size >= 16 and pos + 20 <= len(data):
            byte_rate = int.from_bytes(data[pos + 16 : pos + 20], "little")  # average bytes/second
        elif chunk_id == b"data":
            if byte_rate <= 0 or size >= _UNKNOWN_WAV_SIZES:
                return None
            if size == 0:
                # 0 is also "unknown" to some streaming writers; it is a promise only when
                # nothing follows the header.
                return 0.0 if pos + 8 == len(data) else None
            return size / byte_rate
        pos += 8 + size + (size & 1)
    return None


def _mp3_has_length_header(data: bytes) -> bool:
    """Whether the first MPEG audio frame is a Xing/Info/VBRI frame, which counts the frames."""
    pos = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        size = 0
        for byte in data[6:10]:  # syncsafe: 7 bits per byte
            size = (size << 7) | (byte & 0x7F)
        pos = 10 + size + (10 if data[5] & 0x10 else 0)
    # Find the first frame's sync word; the tag sits 4 + (9..32) bytes past it (36 for VBRI).
    end = min(len(data) - 1, pos + 64 * 1024)
    while True:
        pos = data.find(b"\xff", pos, end)
        if pos < 0:
            return False
        if data[pos + 1] & 0xE0 == 0xE0:
            break
        pos += 1
    head = data[pos : pos + 64]
    return any(tag in head for tag in (b"Xing", b"Info", b"VBRI"))


# ---- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decoded:
    samples: np.ndarray
    source_rate: int
    source_channels: int
    bad_packets: int
    failure: Exception | None  # what stopped decoding early, if anything did


def _decode_stream(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    *,
    sample_rate: int,
    max_duration: float,
) -> _Decoded:
    """Demux and decode one audio stream to int16 mono chunks, stopping past ``max_duration``.

    A packet the decoder rejects as invalid is skipped, as players do. Any other error ends
    decoding; it is returned in ``failure`` with what was decoded before it.
    """
    max_samples = int(max_duration * sample_rate)
    chunks: list[np.ndarray] = []
    total = 0
    bad_packets = 0
    failure: Exception | None = None
    source_rate = stream.codec_context.sample_rate or 0
    source_channels = stream.codec_context.channels or 0
    resampler: av.AudioResampler | None = None
    setup: tuple[str, str, int] | None = None

    def take(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for out in frames:
            chunk = out.to_ndarray().reshape(-1)
            chunks.append(chunk)
            total += len(chunk)
        if total > max_samples:
            raise _too_long("it runs past", max_duration)

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except _PYAV_ERRORS as exc:
            failure = exc
            break
        try:
            frames = packet.decode()
        except av.InvalidDataError:
            bad_packets += 1
            continue
        except _PYAV_ERRORS as exc:
            failure = exc
            break
        try:
            for frame in frames:
                if not isinstance(frame, av.AudioFrame) or frame.samples == 0:
                    continue
                frame_setup = (frame.format.name, frame.layout.name, frame.sample_rate)
                if resampler is None or frame_setup != setup:
                    # The first frame, or the stream changed rate or channels mid-way (chained
                    # Ogg, concatenated MP3): flush the old resampler and start a fresh one.
                    if resampler is not None:
                        take(resampler.resample(None))
                    # frame_size groups the output into 1-second chunks: a short list.
                    resampler = av.AudioResampler(
                        format="s16", layout="mono", rate=sample_rate, frame_size=sample_rate
                    )
                    if setup is None:
                        source_rate, source_channels = frame.sample_rate, frame.layout.nb_channels
                    setup = frame_setup
                take(resampler.resample(frame))
        except _PYAV_ERRORS as exc:
            failure = exc
            break
    if resampler is not None:
        try:
            take(resampler.resample(None))
        except _PYAV_ERRORS as exc:
            failure = failure or exc

    # One float32 array, filled chunk by chunk while the int16 chunks are let go.
    samples = np.empty(total, dtype=np.float32)
    pos = 0
    for i, chunk in enumerate(chunks):
        np.multiply(chunk, _INT16_SCALE, out=samples[pos : pos + len(chunk)])
        pos += len(chunk)
        chunks[i] = _EMPTY_INT16
    return _Decoded(samples, source_rate, source_channels, bad_packets, failure)


_EMPTY_INT16 = np.empty(0, dtype=np.int16)


# ---- cutting long audio -----------------------------------------------------------------------


@dataclass(frozen=True)
class AudioSpan:
    """A stretch of samples ``[start, end)``.

    Attributes:
        start: Index of the first sample.
        end: Index one past the last sample.
        sample_rate: Samples per second, for the times in seconds.
    """

    start: int
    end: int
    sample_rate: int = 16000

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end / self.sample_rate

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / self.sample_rate


# Where to look for a cut: the last third of a span, at most this long. Speech pauses every few
# seconds, and the VAD runs only here (plus a second either side): for two hours of speech on
# two CPU cores, about 0.5 s with 10-minute spans and 6.5 s with 30-second ones, against 17 s
# for the whole file.
_SEARCH_FRACTION = 1 / 3
_SEARCH_MAX_S = 20.0
# Audio on either side of the search window that the VAD hears too, to settle its state.
_VAD_CONTEXT_S = 1.0
_VAD_OPTIONS = VadOptions(min_silence_duration_ms=100, speech_pad_ms=0, min_speech_duration_ms=0)
_VAD_RATE = 16000  # the Silero model bundled with faster-whisper runs at 16 kHz
_ENERGY_WINDOW_S = 0.1
_ENERGY_HOP_S = 0.01
# Pauses whose quietest 100 ms is within this much of the quietest pause in the window count as
# equally quiet, and the longest of them wins. A break between sentences is usually both longer
# and quieter (no breath, no tail of the last word) than a pause inside one.
_PAUSE_LEVEL_TOLERANCE_DB = 6.0


def split_on_silence(
    samples: np.ndarray, *, max_span_s: float, sample_rate: int = 16000
) -> list[AudioSpan]:
    """Cut audio into contiguous spans no longer than ``max_span_s``, at pauses where possible.

    The spans tile the audio exactly (the first starts at 0, each starts where the one before
    ends, the last ends at ``len(samples)``), so a time inside a span plus its ``start_s`` is a
    time in the file. Each cut lies in the last third (at most 20 s) of the span it ends:
    in the middle of the quietest, then longest, pause between speech that the Silero VAD
    hears there; where it hears none, at the centre of the quietest 100 ms; where the search
    window is shorter than 100 ms, exactly at the limit.

    Args:
        samples: Mono samples.
        max_span_s: Longest span, in seconds.
        sample_rate: Rate of ``samples``, in Hz. The VAD is used only at 16 kHz.

    Returns:
        The spans in order; one span if the audio is no longer than ``max_span_s``.

    Raises:
        ValueError: ``max_span_s`` is shorter than one sample.
    """
    n = len(samples)
    max_len = int(max_span_s * sample_rate)
    if max_len < 1:
        raise ValueError(f"max_span_s must be at least one sample long, got {max_span_s}")
    if n <= max_len:
        return [AudioSpan(0, n, sample_rate)]

    use_vad = sample_rate == _VAD_RATE
    search_len = max(1, min(int(max_len * _SEARCH_FRACTION), int(_SEARCH_MAX_S * sample_rate)))
    spans: list[AudioSpan] = []
    how_cut = {"pause": 0, "quiet": 0, "limit": 0}
    start = 0
    while n - start > max_len:
        hi = start + max_len
        lo = max(start + 1, hi - search_len)
        cut, how = _find_cut(samples, lo, hi, sample_rate, use_vad=use_vad)
        how_cut[how] += 1
        spans.append(AudioSpan(start, cut, sample_rate))
        start = cut
    spans.append(AudioSpan(start, n, sample_rate))

    if how_cut["quiet"] or how_cut["limit"]:
        logger.info(
            "split %.0f s into %d spans; %d cuts found no pause between speech%s and went to "
            "the quietest 100 ms (%d) or the span limit (%d)",
            n / sample_rate,
            len(spans),
            how_cut["quiet"] + how_cut["limit"],
            "" if use_vad else f" (no VAD at {sample_rate} Hz)",
            how_cut["quiet"],
            how_cut["limit"],
        )
    return spans


def pcm_slice(samples: np.ndarray, span: AudioSpan) -> np.ndarray:
    """The samples of ``span`` (a view, not a copy)."""
    return samples[span.start : span.end]


def _find_cut(
    samples: np.ndarray, lo: int, hi: int, sample_rate: int, *, use_vad: bool
) -> tuple[int, str]:
    """Where to cut in ``[lo, hi]``, and how it was chosen (``pause``, ``quiet`` or ``limit``)."""
    width = int(_ENERGY_WINDOW_S * sample_rate)
    if width < 1 or hi - lo < width:
        return hi, "limit"
    hop = max(1, int(_ENERGY_HOP_S * sample_rate))
    region = np.asarray(samples[lo:hi], dtype=np.float64)
    energy = np.concatenate(([0.0], np.cumsum(region * region)))

    def quietest(a: int, b: int) -> tuple[float, int]:
        """Level in dB of the quietest window in ``region[a:b]``, and that window's centre."""
        w = min(width, b - a)
        starts = np.arange(a, b - w + 1, hop)
        power = (energy[starts + w] - energy[starts]) / w
        i = int(np.argmin(power))
        return 10 * float(np.log10(power[i] + 1e-10)), int(starts[i]) + w // 2

    if use_vad:
        pauses = [(a - lo, b - lo) for a, b in _vad_pauses(samples, lo, hi)]
        pauses = [p for p in pauses if p[1] - p[0] >= width] or pauses
        if pauses:
            levels = [quietest(a, b)[0] for a, b in pauses]
            floor = min(levels)
            quiet = [
                pause
                for pause, level in zip(pauses, levels, strict=True)
                if level <= floor + _PAUSE_LEVEL_TOLERANCE_DB
            ]
            a, b = max(quiet, key=lambda p: (p[1] - p[0], p[0]))
            return lo + (a + b) // 2, "pause"
    return lo + quietest(0, hi - lo)[1], "quiet"


def _vad_pauses(samples: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The stretches of ``[lo, hi]`` between speech; none if the VAD hears no speech at all."""
    context = int(_VAD_CONTEXT_S * _VAD_RATE)
    begin = max(0, lo - context)
    end = min(len(samples), hi + context)
    window = np.asarray(samples[begin:end], dtype=np.float32)
    speech = get_speech_timestamps(window, _VAD_OPTIONS, sampling_rate=_VAD_RATE)
    if not speech:
        return []
    pauses = []
    pause_start = lo
    for segment in [*speech, {"start": end - begin, "end": end - begin}]:
        pause_end = min(hi, begin + segment["start"])
        if pause_end > pause_start:
            pauses.append((pause_start, pause_end))
        pause_start = max(pause_start, begin + segment["end"])
    return pauses
