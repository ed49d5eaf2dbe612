"""What a diarized request brings besides its audio: the known speakers' reference clips,
decoded, and, when a file's channels are the speakers, one audio source per channel."""

from __future__ import annotations

import contextlib
import logging
from contextlib import ExitStack

import numpy as np

from server.api.protocol import TranscriptionRequest
from server.audio.decode import ALL_CHANNELS, AudioStream
from server.audio.decoders import DecoderPool, DecoderStream
from server.audio.pieces import AudioSource
from server.audio.upload import Upload
from server.diarization import DiarizationOptions
from server.diarization.channels import MAX_CHANNELS, ChannelSource, measure
from server.errors import AudioError, InvalidRequestError

logger = logging.getLogger(__name__)

# OpenAI: reference clips of 2-10 s; a little either side is let through (encoders pad).
_REFERENCE_SECONDS = (1.8, 10.5)
# Longest clip decoded at all: past it the clip is refused as too long without more work.
_REFERENCE_DECODE_LIMIT_S = 60.0


def diarization_inputs(
    req: TranscriptionRequest,
    audio: AudioStream | DecoderStream,
    decoders: DecoderPool,
    *,
    max_duration: float,
    scope: ExitStack,
) -> tuple[DiarizationOptions, tuple[AudioSource, ...]]:
    """A diarized request's options (its reference clips decoded) and its channel sources
    (blocking).

    Args:
        req: The diarized request.
        audio: Its upload, opened (only the header is read).
        decoders: The decoder processes.
        max_duration: ``WHISPER_MAX_AUDIO_DURATION``.
        scope: Closes each channel source opened here; each is entered in the thread that
            opens it, so none is lost when the request is cancelled meanwhile.

    Returns:
        The options, and a source per channel when the channels are the speakers (else none).

    Raises:
        InvalidRequestError: a reference clip is not 2-10 s of audio, or
            ``diarize_by_channel=on`` for a file of more than MAX_CHANNELS channels.
    """
    options = DiarizationOptions(
        min_speakers=req.min_speakers,
        max_speakers=req.max_speakers,
        references=reference_clips(req, decoders),
        by_channel=req.diarize_by_channel,
    )
    return options, channel_sources(
        req, audio.info.source_channels, decoders, max_duration=max_duration, scope=scope
    )


def reference_clips(
    req: TranscriptionRequest, decoders: DecoderPool
) -> tuple[tuple[str, np.ndarray], ...]:
    """Each ``known_speaker_references[]`` clip decoded, with its name (blocking).

    Args:
        req: The request, its data URLs already turned into bytes.
        decoders: The decoder processes.

    Returns:
        ``(name, 16 kHz samples)`` per known speaker, in the order sent.

    Raises:
        InvalidRequestError: a clip is not audio, or not 2-10 s long.
    """
    references = []
    for index, (name, data) in enumerate(
        zip(req.known_speaker_names, req.known_speaker_references, strict=True)
    ):
        try:
            clip = decoders.decode(Upload(data), max_duration=_REFERENCE_DECODE_LIMIT_S)
        except AudioError as exc:
            raise InvalidRequestError(
                f"known_speaker_references[{index}] ({name!r}) is not audio the server can "
                f"decode: {exc.message}",
                param="known_speaker_references",
                code=exc.code,
            ) from exc
        lo, hi = _REFERENCE_SECONDS
        if not lo <= clip.duration <= hi:
            raise InvalidRequestError(
                f"known_speaker_references[{index}] ({name!r}) is {clip.duration:.1f} s "
                "long; send a clip of 2 to 10 seconds of that person speaking.",
                param="known_speaker_references",
            )
        references.append((name, clip.samples))
    return tuple(references)


def channel_sources(
    req: TranscriptionRequest,
    count: int,
    decoders: DecoderPool,
    *,
    max_duration: float,
    scope: ExitStack,
) -> tuple[AudioSource, ...]:
    """One source per channel when a file's channels are the speakers (blocking): with
    ``diarize_by_channel=on``, or ``auto`` when the channels carry different voices.

    Args:
        req: The diarized request.
        count: The file's channels.
        decoders: The decoder processes.
        max_duration: ``WHISPER_MAX_AUDIO_DURATION``.
        scope: Closes each source opened here.

    Returns:
        A source per channel, each with its gain; none to diarize the channels mixed down.

    Raises:
        InvalidRequestError: ``diarize_by_channel=on`` for more than MAX_CHANNELS channels.
    """
    if count < 2 or req.diarize_by_channel == "off":
        return ()
    if count > MAX_CHANNELS:
        if req.diarize_by_channel == "on":
            raise InvalidRequestError(
                f"diarize_by_channel=on takes files of up to {MAX_CHANNELS} channels, one "
                f"speaker each; this one has {count}. Send diarize_by_channel=auto or off "
                "to diarize the channels mixed down to one.",
                param="diarize_by_channel",
                code="too_many_channels",
            )
        logger.info(
            "diarizing %d channels as one: more than the %d diarized one by one",
            count,
            MAX_CHANNELS,
        )
        return ()
    with contextlib.closing(
        decoders.open(req.file, max_duration=max_duration, channel=ALL_CHANNELS)
    ) as every_channel:
        levels = measure(every_channel)
    if req.diarize_by_channel == "auto" and not levels.separate:
        logger.info(
            "diarizing %d channels as one: they carry the same voices (waveform r=%.2f, "
            "envelope r=%.2f)",
            count,
            levels.correlation,
            levels.envelope_correlation,
        )
        return ()
    logger.info(
        "diarizing by channel: %d channels (waveform r=%.2f, envelope r=%.2f, %s)",
        count,
        levels.correlation,
        levels.envelope_correlation,
        req.diarize_by_channel,
    )
    sources = []
    for c in range(levels.levels.shape[0]):
        stream = decoders.open(req.file, max_duration=max_duration, channel=c)
        scope.callback(stream.close)
        sources.append(ChannelSource(stream, c, levels.gain(c)))
    return tuple(sources)
