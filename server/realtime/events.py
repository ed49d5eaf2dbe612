"""The Realtime API's wire for transcription sessions, in its two dialects.

OpenAI's Realtime API has a current (GA) dialect, where a transcription session is configured
by ``session.update`` with ``session.type = "transcription"`` and nested ``audio.input``
settings, and the older beta dialect (``OpenAI-Beta: realtime=v1``), configured by
``transcription_session.update`` with flat ``input_audio_*`` fields. Both share the buffer
events (``input_audio_buffer.*``) and the transcription events
(``conversation.item.input_audio_transcription.*``).

The pydantic models here mirror the ``openai`` SDK's types field for field (each cites the type
it mirrors); both dialects are parsed into one :class:`SessionConfig`, and a session renders
its configuration back in the dialect the client spoke. Unknown fields are ignored, as newer
SDKs add options this server has no use for; values of known fields are checked.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import InvalidRequestError, quote
from server.realtime.audio import InputFormat

Dialect = Literal["ga", "beta"]

#: The ``include`` value that asks for token log-probabilities (both dialects).
LOGPROBS = "item.input_audio_transcription.logprobs"

# GA format types <-> beta format names.
_GA_FORMATS: dict[str, InputFormat] = {
    "audio/pcm": "pcm16",
    "audio/pcmu": "g711_ulaw",
    "audio/pcma": "g711_alaw",
}
_BETA_FORMATS = {beta: ga for ga, beta in _GA_FORMATS.items()}


# ---- the session's configuration, dialect-neutral ----------------------------------------------


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD's settings (OpenAI's defaults)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SessionConfig:
    """What a transcription session is configured to do; OpenAI's defaults until updated.

    Attributes:
        format: Input audio format.
        model: The transcription model asked for (None: the served model).
        language: The language as sent (None: detect it).
        prompt: Text that conditions every item's decoding.
        keywords: Words to favour (GA ``transcription.keywords``).
        turn_detection: Server VAD's settings, or None when the client commits.
        noise_reduction: The noise reduction type asked for; accepted and echoed, not applied.
        logprobs: Whether completed items carry their tokens' log-probabilities.
    """

    format: InputFormat = "pcm16"
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    keywords: tuple[str, ...] = ()
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    noise_reduction: str | None = None
    logprobs: bool = False


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

_CLIENT_EVENTS: dict[str, type[_Wire]] = {
    "session.update": SessionUpdate,
    "transcription_session.update": TranscriptionSessionUpdate,
    "input_audio_buffer.append": BufferAppend,
    "input_audio_buffer.commit": BufferCommit,
    "input_audio_buffer.clear": BufferClear,
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
        EventError: not JSON (or nested too deeply to parse), not an object, a type this server does not handle (the
            conversation and response events of a voice session), or fields of the wrong
            shape.
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
    model = _CLIENT_EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise EventError(
            f"Unsupported event type {quote(kind)} for a transcription session; this server "
            f"handles {', '.join(_CLIENT_EVENTS)}.",
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


# ---- applying updates ---------------------------------------------------------------------------


def _turn_detection(
    current: TurnDetection | None, sent: ServerVad | None, param: str, event_id: str | None
) -> TurnDetection | None:
    if sent is None:
        return None
    if sent.type != "server_vad":
        raise EventError(
            f"Turn detection {quote(sent.type)} is not supported; use 'server_vad' or null "
            "(the client commits).",
            event_id=event_id,
            param=f"{param}.type",
            code="invalid_value",
        )
    base = current or TurnDetection()
    given = {
        name: getattr(sent, name)
        for name in ("threshold", "prefix_padding_ms", "silence_duration_ms")
        if getattr(sent, name) is not None
    }
    return replace(base, **given)


def _transcription(config: SessionConfig, sent: Transcription | None) -> SessionConfig:
    if sent is None:
        return config
    fields: dict[str, Any] = {
        name: getattr(sent, name)
        for name in ("model", "language", "prompt")
        if name in sent.model_fields_set
    }
    if sent.keywords is not None:
        fields["keywords"] = tuple(sent.keywords)
    return replace(config, **fields)


def apply_ga(config: SessionConfig, event: SessionUpdate) -> SessionConfig:
    """``config`` with what a GA ``session.update`` sets; fields it leaves out are unchanged,
    and an explicit null turns turn detection (or noise reduction) off.

    Raises:
        EventError: a realtime (voice) session or a turn detection other than server VAD.
    """
    session = event.session
    if session.type != "transcription":
        raise EventError(
            "This server serves transcription sessions only; send session.type "
            "'transcription' (and connect with ?intent=transcription).",
            event_id=event.event_id,
            param="session.type",
            code="invalid_value",
        )
    if session.include is not None:
        config = replace(config, logprobs=LOGPROBS in session.include)
    audio_input = session.audio.input if session.audio is not None else None
    if audio_input is None:
        return config
    sent = audio_input.model_fields_set
    if audio_input.format is not None:
        config = replace(config, format=_GA_FORMATS[audio_input.format.type])
    config = _transcription(config, audio_input.transcription)
    if "turn_detection" in sent:
        detection = _turn_detection(
            config.turn_detection,
            audio_input.turn_detection,
            "session.audio.input.turn_detection",
            event.event_id,
        )
        config = replace(config, turn_detection=detection)
    if "noise_reduction" in sent:
        reduction = audio_input.noise_reduction
        config = replace(config, noise_reduction=reduction.type if reduction else None)
    return config


def apply_beta(config: SessionConfig, event: TranscriptionSessionUpdate) -> SessionConfig:
    """``config`` with what a beta ``transcription_session.update`` sets (same rules as
    :func:`apply_ga`).

    Raises:
        EventError: a turn detection other than server VAD.
    """
    session = event.session
    sent = session.model_fields_set
    if session.include is not None:
        config = replace(config, logprobs=LOGPROBS in session.include)
    if session.input_audio_format is not None:
        config = replace(config, format=session.input_audio_format)
    config = _transcription(config, session.input_audio_transcription)
    if "turn_detection" in sent:
        detection = _turn_detection(
            config.turn_detection, session.turn_detection, "session.turn_detection", event.event_id
        )
        config = replace(config, turn_detection=detection)
    if "input_audio_noise_reduction" in sent:
        reduction = session.input_audio_noise_reduction
        config = replace(config, noise_reduction=reduction.type if reduction else None)
    return config


# ---- rendering ---------------------------------------------------------------------------------


def _detection_body(detection: TurnDetection | None) -> dict[str, Any] | None:
    if detection is None:
        return None
    return {
        "type": "server_vad",
        "threshold": detection.threshold,
        "prefix_padding_ms": detection.prefix_padding_ms,
        "silence_duration_ms": detection.silence_duration_ms,
    }


def _transcription_body(config: SessionConfig, served: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model or served,
        "language": config.language,
        "prompt": config.prompt,
    }
    if config.keywords:
        body["keywords"] = list(config.keywords)
    return body


def session_body(
    config: SessionConfig, dialect: Dialect, *, session_id: str, served: str
) -> dict[str, Any]:
    """The session object of ``session.created``/``.updated`` (GA: mirrors
    ``RealtimeTranscriptionSessionCreateResponse``) or ``transcription_session.created``/
    ``.updated`` (beta: mirrors ``openai.types.beta.realtime.TranscriptionSession``).

    Args:
        served: The served model's name, shown when the client named none.
    """
    include = [LOGPROBS] if config.logprobs else []
    reduction = {"type": config.noise_reduction} if config.noise_reduction else None
    if dialect == "ga":
        audio_format: dict[str, Any] = {"type": _BETA_FORMATS[config.format]}
        if config.format == "pcm16":
            audio_format["rate"] = 24000
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": session_id,
            "audio": {
                "input": {
                    "format": audio_format,
                    "transcription": _transcription_body(config, served),
                    "turn_detection": _detection_body(config.turn_detection),
                    "noise_reduction": reduction,
                }
            },
            "include": include,
        }
    return {
        "object": "realtime.transcription_session",
        "id": session_id,
        "modalities": ["text"],
        "input_audio_format": config.format,
        "input_audio_transcription": _transcription_body(config, served),
        "turn_detection": _detection_body(config.turn_detection),
        "input_audio_noise_reduction": reduction,
        "include": include,
    }


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (``event_...``, ``item_...``, ``sess_...``)."""
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def server_event(kind: str, **fields: Any) -> dict[str, Any]:
    """A server event of type ``kind`` with a fresh ``event_id`` (every server event has one)."""
    return {"event_id": new_id("event"), "type": kind, **fields}


def error_event(error: InvalidRequestError | Any, event_id: str | None = None) -> dict[str, Any]:
    """An ``error`` event (mirrors ``openai.types.realtime.realtime_error_event
    .RealtimeErrorEvent``) for any :class:`~server.errors.APIError`.

    Args:
        event_id: The client event at fault, if any (``error.event_id``).
    """
    body = error.body()["error"]
    return server_event("error", error={**body, "event_id": event_id})


__all__ = [
    "LOGPROBS",
    "BufferAppend",
    "BufferClear",
    "BufferCommit",
    "ClientEvent",
    "Dialect",
    "EventError",
    "SessionConfig",
    "SessionUpdate",
    "TranscriptionSessionUpdate",
    "TurnDetection",
    "apply_beta",
    "apply_ga",
    "error_event",
    "new_id",
    "parse_client_event",
    "server_event",
    "session_body",
]
