"""A transcription session's configuration, whichever dialect set it.

Both dialects' updates (:mod:`server.realtime.events`) are applied to one
:class:`SessionConfig`, and a session renders its configuration back in the dialect the client
spoke (the ``session`` of ``session.created`` / ``.updated``). Fields an update leaves out are
unchanged; an explicit null turns turn detection (or noise reduction) off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from server.errors import quote
from server.realtime.audio import InputFormat
from server.realtime.events import (
    Dialect,
    EventError,
    ServerVad,
    SessionUpdate,
    Transcription,
    TranscriptionSessionUpdate,
)

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


__all__ = [
    "LOGPROBS",
    "SessionConfig",
    "TurnDetection",
    "apply_beta",
    "apply_ga",
    "session_body",
]
