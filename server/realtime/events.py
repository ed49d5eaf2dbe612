"""The client events of a transcription session: OpenAI's Realtime wire, in its two dialects.

OpenAI's Realtime API has a current (GA) dialect, where a transcription session is configured
by ``session.update`` with ``session.type = "transcription"`` and nested ``audio.input``
settings, and the older beta dialect (``OpenAI-Beta: realtime=v1``), configured by
``transcription_session.update`` with flat ``input_audio_*`` fields. Both share the buffer
events (``input_audio_buffer.*``).

The pydantic models here mirror the ``openai`` SDK's types field for field (each cites the type
it mirrors), and each client event's type name is its model's ``type`` literal, nowhere else.
Unknown fields are ignored, as newer SDKs add options this server has no use for; values of
known fields are checked. The events the server sends are in :mod:`server.realtime.server_events`;
what an update does to the session's configuration is in :mod:`server.realtime.session_config`.
"""

from __future__ import annotations

import json
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import InvalidRequestError, quote

Dialect = Literal["ga", "beta"]

# ---- wire models -------------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AudioFormat(_Wire):
    """Mirrors ``openai.types.realtime.realtime_audio_formats`` (``AudioPCM`` / ``AudioPCMU`` /
    ``AudioPCMA``): PCM is 24 kHz only."""

    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: Literal[24000] | None = None


class Transcription(_Wire):
    """Mirrors ``openai.types.realtime.audio_transcription.AudioTranscription`` (and the beta
    ``SessionInputAudioTranscription``: ``model``, ``language``, ``prompt``)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    keywords: list[str] | None = None


class ServerVad(_Wire):
    """Mirrors ``openai.types.realtime.realtime_transcription_session_audio_input_turn_detection
    .ServerVad`` (and the beta ``SessionTurnDetection``). ``semantic_vad`` is parsed so that it
    can be refused with a message, not a schema error."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(None, ge=0, le=10_000)


class NoiseReduction(_Wire):
    """Mirrors ``openai.types.realtime.realtime_transcription_session_audio_input
    .NoiseReduction``."""

    type: Literal["near_field", "far_field"] | None = None
    strength: float | None = None


class AudioInput(_Wire):
    """Mirrors ``openai.types.realtime.realtime_transcription_session_audio_input
    .RealtimeTranscriptionSessionAudioInput``."""

    format: AudioFormat | None = None
    transcription: Transcription | None = None
    turn_detection: ServerVad | None = None
    noise_reduction: NoiseReduction | None = None


class Audio(_Wire):
    """Mirrors ``openai.types.realtime.realtime_transcription_session_audio
    .RealtimeTranscriptionSessionAudio``."""

    input: AudioInput | None = None


class GASession(_Wire):
    """Mirrors ``openai.types.realtime.realtime_transcription_session_create_request
    .RealtimeTranscriptionSessionCreateRequest`` (the ``session`` of ``session.update``)."""

    type: Literal["transcription", "realtime"] = "transcription"
    audio: Audio | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


class BetaSession(_Wire):
    """Mirrors ``openai.types.beta.realtime.transcription_session_update.Session``."""

    input_audio_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] | None = None
    input_audio_transcription: Transcription | None = None
    turn_detection: ServerVad | None = None
    input_audio_noise_reduction: NoiseReduction | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


class SessionUpdate(_Wire):
    """Mirrors ``openai.types.realtime.session_update_event.SessionUpdateEvent``."""

    type: Literal["session.update"]
    session: GASession
    event_id: str | None = None


class TranscriptionSessionUpdate(_Wire):
    """Mirrors ``openai.types.beta.realtime.transcription_session_update
    .TranscriptionSessionUpdate``."""

    type: Literal["transcription_session.update"]
    session: BetaSession
    event_id: str | None = None


class BufferAppend(_Wire):
    """Mirrors ``openai.types.realtime.input_audio_buffer_append_event
    .InputAudioBufferAppendEvent``."""

    type: Literal["input_audio_buffer.append"]
    audio: str
    event_id: str | None = None


class BufferCommit(_Wire):
    """Mirrors ``openai.types.realtime.input_audio_buffer_commit_event
    .InputAudioBufferCommitEvent``."""

    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class BufferClear(_Wire):
    """Mirrors ``openai.types.realtime.input_audio_buffer_clear_event
    .InputAudioBufferClearEvent``."""

    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


ClientEvent = SessionUpdate | TranscriptionSessionUpdate | BufferAppend | BufferCommit | BufferClear


def _type_name(model: type[_Wire]) -> str:
    """The event type a client event model accepts: its ``type`` literal."""
    (name,) = get_args(model.model_fields["type"].annotation)
    return str(name)


#: The client events this server handles, by type name.
CLIENT_EVENTS: dict[str, type[_Wire]] = {
    _type_name(model): model
    for model in (
        SessionUpdate,
        TranscriptionSessionUpdate,
        BufferAppend,
        BufferCommit,
        BufferClear,
    )
}


class EventError(InvalidRequestError):
    """A client event this server cannot act on; it becomes an ``error`` event and the
    connection stays open.

    Attributes:
        event_id: The offending client event's ``event_id``, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        event_id: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.event_id = event_id


def parse_client_event(text: str | bytes) -> ClientEvent:
    """One client message -> a typed event.

    Raises:
        EventError: not JSON (or nested too deeply to parse), not an object, a type this
            server does not handle (the conversation and response events of a voice session),
            or fields of the wrong shape.
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError(
            f"The message is not valid JSON ({exc}); send each event as a JSON object.",
            code="invalid_json",
        ) from exc
    except RecursionError:
        # The parser recurses per level of nesting; no event is nested more than a few deep.
        raise EventError(
            "The message nests too deeply to parse; send each event as a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise EventError("Each event must be a JSON object with a 'type'.", code="invalid_event")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    model = CLIENT_EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise EventError(
            f"Unsupported event type {quote(kind)} for a transcription session; this server "
            f"handles {', '.join(CLIENT_EVENTS)}.",
            event_id=event_id,
            param="type",
            code="unsupported_event",
        )
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise EventError(
            f"Invalid '{param}': {first['msg']}." if param else f"Invalid event: {first['msg']}.",
            event_id=event_id,
            param=param,
            code="invalid_value",
        ) from exc


__all__ = [
    "CLIENT_EVENTS",
    "AudioInput",
    "BetaSession",
    "BufferAppend",
    "BufferClear",
    "BufferCommit",
    "ClientEvent",
    "Dialect",
    "EventError",
    "GASession",
    "ServerVad",
    "SessionUpdate",
    "Transcription",
    "TranscriptionSessionUpdate",
    "parse_client_event",
]
