"""Uploaded audio -> 16 kHz float32 (mono, one channel, or every channel), decoded on demand.

Decoding uses PyAV, which bundles the FFmpeg libraries, on the upload where it is held (bytes in
memory, or a temporary file: :class:`~server.audio.upload.Upload`). The container is recognised by
its content alone: clients such as the ``openai`` SDK send files named ``upload``, and no part
of a request is ever used as a path. Only the demuxers for the formats OpenAI's API accepts are
enabled, so FFmpeg's playlist and concat readers can never be reached. Samples come out of
FFmpeg's resampler as packed (interleaved) 16-bit frames and are read with explicit sizes, for
every channel count and sample format (see :func:`_samples`). In the server, all of this runs in
decoder processes of its own (``server.audio.decoders``), so that a fault in FFmpeg takes down one
decoder, never the server.

This module needs only PyAV and NumPy: the decoder processes import it and nothing heavier.

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

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import av
import numpy as np
from av.audio.plane import AudioPlane

from server.audio.upload import Upload
from server.errors import AudioError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""The rate Whisper (and every model the server runs) listens at, in Hz."""

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
    data: bytes | Upload, *, max_duration: float, sample_rate: int = SAMPLE_RATE
) -> DecodedAudio:
    """Decode a whole upload to mono float32 at ``sample_rate``.

    For audio that may be long, open an :class:`AudioStream` instead and read it piece by piece:
    this holds every sample at once.

    Args:
        data: The upload (its bytes, or an :class:`~server.audio.upload.Upload`). The format is
            detected from its content; no file name is needed.
        max_duration: Longest audio accepted, in seconds.
        sample_rate: Rate of the returned samples, in Hz.

    Returns:
        The samples with their duration and what the source was.

    Raises:
        AudioError: The bytes are not usable audio; ``code`` says why (see the module doc).
        ValueError: ``max_duration`` or ``sample_rate`` is not positive.
    """
    with AudioStream(data, max_duration=max_duration, sample_rate=sample_rate) as stream:
        return read_whole(stream)


class Int16Stream(Protocol):
    """What :func:`read_whole` needs: an :class:`AudioStream`, or its proxy in a decoder
    process (``server.audio.decoders``)."""

    sample_rate: int
    info: AudioInfo

    def int16_chunks(self) -> Iterator[np.ndarray]: ...


def read_whole(stream: Int16Stream) -> DecodedAudio:
    """Every remaining sample of a mono stream as one float32 array.

    Raises:
        AudioError: decoding failed (see the module doc).
    """
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
        duration=total / stream.sample_rate,
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


#: ``channel`` for an :class:`AudioStream` that reads every channel.
ALL_CHANNELS: Literal["all"] = "all"
Channel = int | Literal["all"] | None


class AudioStream:
    """An upload decoded on demand, a few seconds at a time.

    Opening it reads only the container's header: an upload that is not audio, or whose header
    declares more than ``max_duration``, is refused before any memory is spent on samples.
    :meth:`read` then decodes just as many samples as asked for, so a four-hour upload never
    exists as one array. Decoding checks the limit again as it goes (the header may lie), and
    when the stream ends it checks the audio against the header's promise: every problem is an
    :class:`~server.errors.AudioError` with the codes of the module doc.

    Args:
        data: The upload: its bytes, or an :class:`~server.audio.upload.Upload` (in memory or on
            disk; it stays the caller's to close).
        max_duration: Longest audio accepted, in seconds.
        sample_rate: Rate of the samples produced, in Hz.
        channel: None for every channel mixed down to one; a number for that channel alone (0
            is the first): recordings whose channels are different speakers (calls) are diarized
            by channel; :data:`ALL_CHANNELS` for every channel side by side, so that
            :meth:`read` returns ``(samples, channels)``. A file whose channel layout changes
            part way (chained Ogg) keeps the first layout: later audio is remixed to it.

    Raises:
        AudioError: The upload is empty, not audio, has no audio track, or declares too much.
        ValueError: ``max_duration`` or ``sample_rate`` is not positive, or ``channel`` is
            negative.
    """

    def __init__(
        self,
        data: bytes | Upload,
        *,
        max_duration: float,
        sample_rate: int = SAMPLE_RATE,
        channel: Channel = None,
    ) -> None:
        if max_duration <= 0 or sample_rate <= 0:
            raise ValueError(
                f"max_duration and sample_rate must be positive, got {max_duration}, {sample_rate}"
            )
        if channel not in (None, ALL_CHANNELS) and not (isinstance(channel, int) and channel >= 0):
            raise ValueError(f"channel must be None, a channel number or 'all', got {channel!r}")
        upload = data if isinstance(data, Upload) else Upload(bytes(data))
        if not upload.size:
            raise _error("empty_file", "The uploaded file is empty (0 bytes). " + _SEND_AUDIO)
        self.sample_rate = sample_rate
        self.max_duration = max_duration
        self.channel = channel
        self._max_samples = int(max_duration * sample_rate)
        try:
            self._container = av.open(
                upload.reader(),
                mode="r",
                options={"format_whitelist": ",".join(_DEMUXERS)},
                metadata_errors="ignore",
            )
        except _PYAV_ERRORS as exc:
            raise _error(
                "invalid_audio", f"The uploaded file could not be decoded as audio. {_SEND_AUDIO}"
            ) from exc
        try:
            self._stream = self._open_track(upload)
        except BaseException:
            self._container.close()
            raise
        self._packets = self._container.demux(self._stream)
        self._resampler: av.AudioResampler | None = None
        self._setup: tuple[str, str, int] | None = None
        self._layout: av.AudioLayout | None = None  # what the output keeps (channel modes)
        # int16 chunks decoded but not yet read: (samples,), or (samples, channels) for "all".
        self._pending: deque[np.ndarray] = deque()
        self._total = 0  # samples decoded so far
        self._bad_packets = 0
        self._failure: Exception | None = None
        self._ended = False  # the demuxer is exhausted (or failed) and checks have run
        self._closed = False

    def _open_track(self, upload: Upload) -> av.AudioStream:
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
        declared = _declared_duration(upload, container, stream)
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

        Returns:
            float32 in [-1, 1): ``(samples,)``, or ``(samples, channels)`` when every channel
            is read.

        Raises:
            AudioError: Decoding failed, the audio runs past the limit, or (at the end) the
                stream is empty or shorter than its header promised.
        """
        return to_float(self.read_int16(max_samples))

    def read_int16(self, max_samples: int) -> np.ndarray:
        """:meth:`read`, as the int16 samples the decoder produced.

        Raises:
            AudioError: as :meth:`read`.
        """
        parts: list[np.ndarray] = []
        filled = 0
        want = max(0, max_samples)
        while filled < want:
            if not self._pending:
                if self._ended:
                    break
                self._decode_more()
                continue
            chunk = self._pending.popleft()
            take = min(len(chunk), want - filled)
            parts.append(chunk[:take])
            filled += take
            if take < len(chunk):
                self._pending.appendleft(chunk[take:])
        if not parts:
            shape = (0, len(self._layout.channels)) if self._all and self._layout else (0,)
            return np.empty(shape, dtype=np.int16)
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def width(self) -> int:
        """Columns :meth:`read` returns: 1, or with every channel read, the channels of the
        first frame (decoding it if none has been yet; the header's count if none decodes).

        Raises:
            AudioError: as :meth:`read`, from decoding the first frame.
        """
        if not self._all:
            return 1
        if self._layout is None and not self._ended:
            self._decode_more()
        return self._layout.nb_channels if self._layout is not None else self.info.source_channels

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

    @property
    def _all(self) -> bool:
        return self.channel == ALL_CHANNELS

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
            if self._setup is None:
                self._layout = frame.layout
                self.info = replace(
                    self.info,
                    source_rate=frame.sample_rate,
                    source_channels=frame.layout.nb_channels,
                )
            self._resampler = self._new_resampler(frame, mix=self.channel is None)
            self._setup = frame_setup
            try:
                return self._take(self._resampler.resample(frame))
            except av.ArgumentError:
                if self.channel is not None:
                    raise
                # FFmpeg mixes down only layouts whose channels it can name; channels in no
                # known order ("64 channels") are kept and averaged here instead (_take).
                self._resampler = self._new_resampler(frame, mix=False)
        return self._take(self._resampler.resample(frame))

    def _new_resampler(self, frame: av.AudioFrame, *, mix: bool) -> av.AudioResampler:
        """Mixed down to mono by FFmpeg, or with every channel kept (the first frame's layout
        where one channel or all of them are read, so the columns never change)."""
        if mix:
            return _resampler("mono", self.sample_rate)
        keep = frame.layout if self.channel is None or self._layout is None else self._layout
        return _resampler(keep, self.sample_rate)

    def _take(self, frames: list[av.AudioFrame]) -> bool:
        produced = False
        for out in frames:
            samples = _samples(out)
            if self.channel is None:
                chunk = (
                    samples.reshape(-1)
                    if samples.shape[1] == 1
                    else samples.mean(axis=1, dtype=np.float32).astype(np.int16)
                )
            elif self._all:
                chunk = samples
            else:
                chunk = samples[:, min(self.channel, samples.shape[1] - 1)].copy()
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


def _resampler(layout: str | av.AudioLayout, rate: int) -> av.AudioResampler:
    """FFmpeg's resampler to packed 16-bit ``layout`` at ``rate``, whatever comes in (any
    sample format, planar or packed, any channel count), in 1-second frames: the one form
    :func:`_samples` reads."""
    return av.AudioResampler(format="s16", layout=layout, rate=rate, frame_size=rate)


def _samples(frame: av.AudioFrame) -> np.ndarray:
    """A packed 16-bit frame's samples as ``(samples, channels)`` int16 (a copy).

    Only packed frames come here: PyAV's ``AudioFrame.planes`` (and ``to_ndarray``, which uses
    it) counts planes by walking ``extended_data`` to a NULL pointer, which a planar frame with
    8 or more channels does not have (the pointer array then ends where the channels do), so it
    reads past the array and crashes the process. A packed frame has one plane, read here by
    index with its size given, never searched for.
    """
    if frame.format.is_planar or frame.format.name != "s16":
        raise ValueError(f"expected packed s16 audio, got {frame.format.name}")
    channels = frame.layout.nb_channels
    data = np.frombuffer(
        memoryview(AudioPlane(frame, 0)), dtype=np.int16, count=frame.samples * channels
    )
    return data.reshape(frame.samples, channels).copy()


def to_float(samples: np.ndarray) -> np.ndarray:
    """int16 samples as float32 in [-1, 1)."""
    return np.multiply(samples, _INT16_SCALE, dtype=np.float32)


# ---- what the header promises -----------------------------------------------------------------


def _declared_duration(
    upload: Upload, container: av.container.InputContainer, stream: av.AudioStream
) -> float | None:
    """Seconds of audio the file's header promises, or None where it promises nothing reliable."""
    name = container.format.name
    if name == "wav":
        # FFmpeg clamps a WAV data chunk to the bytes present, hiding truncation; read the header.
        return _wav_declared_duration(upload)
    if name == "mp3" and not _mp3_has_length_header(upload):
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
# Chunks looked at before the data chunk; real files have a handful (fmt, fact, LIST, bext...).
_WAV_MAX_CHUNKS = 1024


def _wav_declared_duration(upload: Upload) -> float | None:
    """Seconds announced by a RIFF/WAVE header's data chunk, or None if it announces none."""
    head = upload.read_at(0, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    byte_rate = 0
    pos = 12
    for _ in range(_WAV_MAX_CHUNKS):
        chunk = upload.read_at(pos, 20)
        if len(chunk) < 8:
            return None
        chunk_id = chunk[:4]
        size = int.from_bytes(chunk[4:8], "little")
        if chunk_id == b"fmt " and size >= 16 and len(chunk) >= 20:
            byte_rate = int.from_bytes(chunk[16:20], "little")  # average bytes/second
        elif chunk_id == b"data":
            if byte_rate <= 0 or size >= _UNKNOWN_WAV_SIZES:
                return None
            if size == 0:
                # 0 is also "unknown" to some streaming writers; it is a promise only when
                # nothing follows the header.
                return 0.0 if pos + 8 == upload.size else None
            return size / byte_rate
        pos += 8 + size + (size & 1)
    return None


def _mp3_has_length_header(upload: Upload) -> bool:
    """Whether the first MPEG audio frame is a Xing/Info/VBRI frame, which counts the frames."""
    pos = 0
    tag = upload.read_at(0, 10)
    if tag[:3] == b"ID3" and len(tag) >= 10:
        size = 0
        for byte in tag[6:10]:  # syncsafe: 7 bits per byte
            size = (size << 7) | (byte & 0x7F)
        pos = 10 + size + (10 if tag[5] & 0x10 else 0)
    # Find the first frame's sync word within 64 KiB; the tag sits 4 + (9..32) bytes past it
    # (36 for VBRI).
    data = upload.read_at(pos, 64 * 1024 + 64)
    end = min(len(data) - 1, 64 * 1024)
    at = 0
    while True:
        at = data.find(b"\xff", at, end)
        if at < 0:
            return False
        if data[at + 1] & 0xE0 == 0xE0:
            break
        at += 1
    head = data[at : at + 64]
    return any(tag in head for tag in (b"Xing", b"Info", b"VBRI"))


_EMPTY_INT16 = np.empty(0, dtype=np.int16)
