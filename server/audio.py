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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import av
import numpy as np

from server.errors import AudioError
from server.runners import SAMPLE_RATE, speech_timestamps

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


def decode_audio(
    data: bytes, *, max_duration: float, sample_rate: int = SAMPLE_RATE
) -> DecodedAudio:
    """Decode a whole upload to mono float32 at ``sample_rate``.

    For audio that may be long, open an :class:`AudioStream` instead and read it piece by piece:
    this holds every sample at once.

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
    with AudioStream(data, max_duration=max_duration, sample_rate=sample_rate) as stream:
        chunks = list(stream.int16_chunks())
        total = sum(len(chunk) for chunk in chunks)
        # One float32 array, filled chunk by chunk while the int16 chunks are let go.
        samples = np.empty(total, dtype=np.float32)
        pos = 0
        for i, chunk in enumerate(chunks):
            np.multiply(chunk, _INT16_SCALE, out=samples[pos : pos + len(chunk)])
            pos += len(chunk)
            chunks[i] = _EMPTY_INT16
        info = stream.info
    return DecodedAudio(
        samples=samples,
        duration=total / sample_rate,
        format_name=info.format_name,
        source_rate=info.source_rate,
        source_channels=info.source_channels,
    )


@dataclass(frozen=True)
class AudioInfo:
    """What a container says about its audio before anything is decoded.

    Attributes:
        format_name: The container FFmpeg recognised, as FFmpeg names it.
        declared: Seconds of audio the header promises, or None when it promises nothing
            reliable (VBR mp3 without a Xing frame, streaming WAV, a browser's WebM recording).
        source_rate: Sample rate of the audio track, in Hz (0 when unknown).
        source_channels: Channels of the audio track (0 when unknown).
    """

    format_name: str
    declared: float | None
    source_rate: int
    source_channels: int


class AudioStream:
    """An upload decoded on demand, a few seconds at a time.

    Opening it reads only the container's header: an upload that is not audio, or whose header
    declares more than ``max_duration``, is refused before any memory is spent on samples.
    :meth:`read` then decodes just as many samples as asked for, so a four-hour upload never
    exists as one array. Decoding checks the limit again as it goes (the header may lie), and
    when the stream ends it checks the audio against the header's promise: every problem is an
    :class:`~server.errors.AudioError` with the codes of the module doc.

    Args:
        data: The uploaded bytes.
        max_duration: Longest audio accepted, in seconds.
        sample_rate: Rate of the samples produced, in Hz.
        channel: One channel's samples (0 is the first) instead of all of them mixed down:
            recordings whose channels are different speakers (calls) are diarized by channel.

    Raises:
        AudioError: The upload is empty, not audio, has no audio track, or declares too much.
        ValueError: ``max_duration`` or ``sample_rate`` is not positive.
    """

    def __init__(
        self,
        data: bytes,
        *,
        max_duration: float,
        sample_rate: int = SAMPLE_RATE,
        channel: int | None = None,
    ) -> None:
        if max_duration <= 0 or sample_rate <= 0:
            raise ValueError(
                f"max_duration and sample_rate must be positive, got {max_duration}, {sample_rate}"
            )
        if not data:
            raise _error("empty_file", "The uploaded file is empty (0 bytes). " + _SEND_AUDIO)
        self.sample_rate = sample_rate
        self.max_duration = max_duration
        self.channel = channel
        self._max_samples = int(max_duration * sample_rate)
        try:
            self._container = av.open(
                io.BytesIO(data),
                mode="r",
                options={"format_whitelist": ",".join(_DEMUXERS)},
                metadata_errors="ignore",
            )
        except _PYAV_ERRORS as exc:
            raise _error(
                "invalid_audio", f"The uploaded file could not be decoded as audio. {_SEND_AUDIO}"
            ) from exc
        try:
            self._stream = self._open_track(data)
        except BaseException:
            self._container.close()
            raise
        self._packets = self._container.demux(self._stream)
        self._resampler: av.AudioResampler | None = None
        self._setup: tuple[str, str, int] | None = None
        self._pending: deque[np.ndarray] = deque()  # int16 chunks decoded but not yet read
        self._total = 0  # samples decoded so far
        self._bad_packets = 0
        self._failure: Exception | None = None
        self._ended = False  # the demuxer is exhausted (or failed) and checks have run
        self._closed = False

    def _open_track(self, data: bytes) -> av.AudioStream:
        container = self._container
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
        if declared is not None and declared > self.max_duration * _DECLARED_TOO_LONG_FACTOR:
            raise _too_long(f"its header declares {_fmt_s(declared)}, over", self.max_duration)
        self.info = AudioInfo(
            format_name=format_name,
            declared=declared,
            source_rate=stream.codec_context.sample_rate or 0,
            source_channels=stream.codec_context.channels or 0,
        )
        return stream

    # ---- reading ----------------------------------------------------------------------------

    @property
    def duration(self) -> float | None:
        """Seconds of audio: exact once the stream has ended, else what the header declares."""
        return self._total / self.sample_rate if self._ended else self.info.declared

    @property
    def decoded_seconds(self) -> float:
        """Seconds decoded so far."""
        return self._total / self.sample_rate

    @property
    def finished(self) -> bool:
        """Whether every sample has been decoded and read."""
        return self._ended and not self._pending

    def read(self, max_samples: int) -> np.ndarray:
        """The next samples, at most ``max_samples`` of them; fewer only at the end.

        Raises:
            AudioError: Decoding failed, the audio runs past the limit, or (at the end) the
                stream is empty or shorter than its header promised.
        """
        out = np.empty(max(0, max_samples), dtype=np.float32)
        filled = 0
        while filled < len(out):
            if not self._pending:
                if self._ended:
                    break
                self._decode_more()
                continue
            chunk = self._pending.popleft()
            take = min(len(chunk), len(out) - filled)
            np.multiply(chunk[:take], _INT16_SCALE, out=out[filled : filled + take])
            filled += take
            if take < len(chunk):
                self._pending.appendleft(chunk[take:])
        return out if filled == len(out) else out[:filled].copy()

    def int16_chunks(self) -> Iterator[np.ndarray]:
        """Every remaining sample as int16 chunks of about a second (whole-file decoding)."""
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self._ended:
                return
            self._decode_more()

    def close(self) -> None:
        """Release the demuxer and decoder."""
        if not self._closed:
            self._closed = True
            self._container.close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- decoding ---------------------------------------------------------------------------

    def _decode_more(self) -> None:
        """Decode packets until some samples come out or the stream ends.

        A packet the decoder rejects as invalid is skipped, as players do. Any other error ends
        decoding; what came before it is kept, and :meth:`_finish` decides what it means.
        """
        produced = False
        while not produced:
            try:
                packet = next(self._packets)
            except StopIteration:
                break
            except _PYAV_ERRORS as exc:
                self._failure = exc
                break
            try:
                frames = packet.decode()
            except av.InvalidDataError:
                self._bad_packets += 1
                continue
            except _PYAV_ERRORS as exc:
                self._failure = exc
                break
            try:
                for frame in frames:
                    if not isinstance(frame, av.AudioFrame) or frame.samples == 0:
                        continue
                    produced |= self._resample(frame)
            except _PYAV_ERRORS as exc:
                self._failure = exc
                break
        else:
            return
        if self._resampler is not None:
            try:
                self._take(self._resampler.resample(None))
            except _PYAV_ERRORS as exc:
                self._failure = self._failure or exc
        self._finish()

    def _resample(self, frame: av.AudioFrame) -> bool:
        frame_setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._resampler is None or frame_setup != self._setup:
            # The first frame, or the stream changed rate or channels mid-way (chained Ogg,
            # concatenated MP3): flush the old resampler and start a fresh one.
            if self._resampler is not None:
                self._take(self._resampler.resample(None))
            # frame_size groups the output into 1-second chunks. One channel is taken from the
            # planar output with every channel kept.
            self._resampler = av.AudioResampler(
                format="s16" if self.channel is None else "s16p",
                layout="mono" if self.channel is None else frame.layout.name,
                rate=self.sample_rate,
                frame_size=self.sample_rate,
            )
            if self._setup is None:
                self.info = replace(
                    self.info,
                    source_rate=frame.sample_rate,
                    source_channels=frame.layout.nb_channels,
                )
            self._setup = frame_setup
        return self._take(self._resampler.resample(frame))

    def _take(self, frames: list[av.AudioFrame]) -> bool:
        produced = False
        for out in frames:
            planes = out.to_ndarray()
            if self.channel is None:
                chunk = planes.reshape(-1)
            else:
                chunk = planes[min(self.channel, len(planes) - 1)].copy()
            if len(chunk):
                self._pending.append(chunk)
                self._total += len(chunk)
                produced = True
        if self._total > self._max_samples:
            raise _too_long("it runs past", self.max_duration)
        return produced

    def _finish(self) -> None:
        """The stream has ended: check what was decoded against what the header promised."""
        self._ended = True
        duration = self._total / self.sample_rate
        declared, failure = self.info.declared, self._failure
        format_name = self.info.format_name
        if failure is not None and self._total == 0:
            raise _error(
                "invalid_audio",
                f"The uploaded file ({format_name}) could not be decoded as audio "
                f"({failure}). {_SEND_AUDIO}",
            ) from failure
        if declared is not None and _falls_short(decoded=duration, declared=declared):
            raise _error(
                "truncated_audio",
                f"The uploaded file looks truncated or corrupt: its header declares "
                f"{_fmt_s(declared)} of audio but only {_fmt_s(duration)} could be decoded. "
                "Upload the complete file, or re-encode it.",
            ) from failure
        if failure is not None:
            raise _error(
                "truncated_audio",
                f"The uploaded file is truncated or corrupt: decoding stopped after "
                f"{_fmt_s(duration)} ({failure}). Upload the complete file, or re-encode it.",
            ) from failure
        if self._total == 0:
            if self._bad_packets:
                raise _error(
                    "invalid_audio",
                    f"The uploaded file ({format_name}) could not be decoded as audio: none of "
                    f"its {self._bad_packets} audio packets decoded. {_SEND_AUDIO}",
                )
            raise _error(
                "empty_audio",
                "The uploaded file contains no audio samples (0 seconds). "
                "Upload a recording that is not empty.",
            )
        if self._bad_packets:
            logger.warning(
                "skipped %d undecodable packets in a %s upload", self._bad_packets, format_name
            )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "decoded %s: %.2f s, %d Hz x %d channels -> %d samples",
                format_name,
                duration,
                self.info.source_rate,
                self.info.source_channels,
                self._total,
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
    sample_rate: int = SAMPLE_RATE

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
_VAD_OPTIONS = {"min_silence_duration_ms": 100, "speech_pad_ms": 0, "min_speech_duration_ms": 0}
_ENERGY_WINDOW_S = 0.1
_ENERGY_HOP_S = 0.01
# Pauses whose quietest 100 ms is within this much of the quietest pause in the window count as
# equally quiet, and the longest of them wins. A break between sentences is usually both longer
# and quieter (no breath, no tail of the last word) than a pause inside one.
_PAUSE_LEVEL_TOLERANCE_DB = 6.0


def split_on_silence(
    samples: np.ndarray, *, max_span_s: float, sample_rate: int = SAMPLE_RATE
) -> list[AudioSpan]:
    """Cut audio into contiguous spans no longer than ``max_span_s``, at pauses where possible.

    The spans tile the audio exactly (the first starts at 0, each starts where the one before
    ends, the last ends at ``len(samples)``), so a time inside a span plus its ``start_s`` is a
    time in the file. Each cut lies in the last third (at most 20 s) of the span it ends:
    in the middle of the quietest, then longest, pause between speech that the Silero VAD
    hears there; where it hears none, at the centre of the quietest 100 ms; where the search
    window is shorter than 100 ms, exactly at the limit. :class:`PieceReader` makes the same
    cuts while decoding, one piece at a time.

    Args:
        samples: Mono samples.
        max_span_s: Longest span, in seconds.
        sample_rate: Rate of ``samples``, in Hz. The VAD is used only at 16 kHz.

    Returns:
        The spans in order; one span if the audio is no longer than ``max_span_s``.

    Raises:
        ValueError: ``max_span_s`` is shorter than one sample.
    """
    reader = PieceReader(ArraySource(samples, sample_rate), sample_rate=sample_rate)
    spans = []
    while (piece := reader.next(max_span_s)) is not None:
        spans.append(AudioSpan(piece.start, piece.end, sample_rate))
    if not spans:
        return [AudioSpan(0, 0, sample_rate)]
    reader.log_cuts()
    return spans


class ArraySource:
    """Samples already in memory, read like an :class:`AudioStream` (views, no copies)."""

    def __init__(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        self.samples = samples
        self.sample_rate = sample_rate
        self._pos = 0

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def decoded_seconds(self) -> float:
        return self._pos / self.sample_rate

    @property
    def finished(self) -> bool:
        return self._pos >= len(self.samples)

    def read(self, max_samples: int) -> np.ndarray:
        out = self.samples[self._pos : self._pos + max(0, max_samples)]
        self._pos += len(out)
        return out

    def close(self) -> None:
        pass


class AudioSource(Protocol):
    """Where a request's samples come from: decoded already (:class:`ArraySource`), decoded as
    they are read (:class:`AudioStream`), or one channel of a call with the other side's
    echo muted (``server.diarization.channels.ChannelSource``)."""

    @property
    def duration(self) -> float | None: ...

    @property
    def decoded_seconds(self) -> float: ...

    @property
    def finished(self) -> bool: ...

    def read(self, max_samples: int) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True, eq=False)  # eq=False: an array has no single truth value
class Piece:
    """A stretch of a request's audio, held while it is transcribed.

    Attributes:
        start: Index of its first sample in the whole audio.
        samples: The samples.
        sample_rate: Samples per second.
        last: Whether the audio ends with it.
    """

    start: int
    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE
    last: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


class PieceReader:
    """Cuts audio into pieces at pauses while reading it, holding one piece at a time.

    Each call to :meth:`next` reads just enough to cut the next piece (its length, plus a
    second the VAD listens to past the limit), cuts it where :func:`split_on_silence` would,
    and keeps the rest for the piece after. So host memory holds one piece and a tail, however
    long the audio.

    Args:
        source: Where the samples come from.
        sample_rate: Their rate, in Hz; the VAD is used only at 16 kHz.
    """

    def __init__(self, source: AudioSource, *, sample_rate: int = SAMPLE_RATE) -> None:
        self.source = source
        self.sample_rate = sample_rate
        self._carry = np.empty(0, dtype=np.float32)
        self._start = 0
        self._cuts = {"pause": 0, "quiet": 0, "limit": 0}

    @property
    def position(self) -> int:
        """Samples handed out in pieces so far."""
        return self._start

    @property
    def finished(self) -> bool:
        """Whether every sample has been handed out."""
        return self.source.finished and not len(self._carry)

    def next(self, max_span_s: float, *, slack_s: float = 0.0) -> Piece | None:
        """The next piece, no longer than ``max_span_s``; None when the audio is used up.

        Args:
            max_span_s: Longest piece, in seconds.
            slack_s: When the audio ends within this much past ``max_span_s``, the piece runs
                to the end instead of leaving a sliver after it.

        Raises:
            ValueError: ``max_span_s`` is shorter than one sample.
            AudioError: Decoding failed (from an :class:`AudioStream`).
        """
        rate = self.sample_rate
        max_len = int(max_span_s * rate)
        if max_len < 1:
            raise ValueError(f"max_span_s must be at least one sample long, got {max_span_s}")
        slack = int(slack_s * rate)
        want = max_len + max(slack, int(_VAD_CONTEXT_S * rate))
        buffer = self._carry
        if len(buffer) < want and not self.source.finished:
            more = self.source.read(want - len(buffer))
            buffer = np.concatenate((buffer, more)) if len(buffer) else more
        if not len(buffer):
            self._carry = buffer
            return None
        if self.source.finished and len(buffer) <= max_len + slack:
            piece, self._carry = buffer, np.empty(0, dtype=np.float32)
        else:
            search_len = max(1, min(int(max_len * _SEARCH_FRACTION), int(_SEARCH_MAX_S * rate)))
            lo = max(1, max_len - search_len)
            cut, how = _find_cut(buffer, lo, max_len, rate, use_vad=rate == SAMPLE_RATE)
            self._cuts[how] += 1
            piece, self._carry = buffer[:cut], buffer[cut:].copy()
        start, self._start = self._start, self._start + len(piece)
        return Piece(start, piece, rate, last=self.finished)

    def log_cuts(self) -> None:
        """Say how the cuts so far were placed, if any missed a pause between speech."""
        cuts = self._cuts
        if cuts["quiet"] or cuts["limit"]:
            logger.info(
                "cut %.0f s into %d pieces; %d cuts found no pause between speech%s and went to "
                "the quietest 100 ms (%d) or the piece limit (%d)",
                self._start / self.sample_rate,
                sum(cuts.values()) + 1,
                cuts["quiet"] + cuts["limit"],
                "" if self.sample_rate == SAMPLE_RATE else f" (no VAD at {self.sample_rate} Hz)",
                cuts["quiet"],
                cuts["limit"],
            )


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
    context = int(_VAD_CONTEXT_S * SAMPLE_RATE)
    begin = max(0, lo - context)
    end = min(len(samples), hi + context)
    window = np.asarray(samples[begin:end], dtype=np.float32)
    speech = speech_timestamps(window, _VAD_OPTIONS)
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
