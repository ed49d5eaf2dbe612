"""The events a transcription session sends: one frozen dataclass per event type.

Each class mirrors the ``openai`` SDK's type of that event field for field (it cites the type),
and holds the event's type name (``type``): this module is the one place the server's event
type names are written. An event gets a fresh ``event_id`` when it is built (every server event
has one), and :meth:`ServerEvent.wire` gives the JSON object sent: ``event_id``, ``type``, then
the fields in the order they are declared here. To add an event: a subclass here, with its
``type`` and its fields, built where the session acts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, TypedDict

from server.errors import APIError
from server.realtime.events import Dialect


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (``event_...``, ``item_...``, ``sess_...``)."""
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def _event_id() -> str:
    return new_id("event")


class ErrorBody(TypedDict):
    """Mirrors ``conversation_item_input_audio_transcription_failed_event.Error``: an error's
    body, as :meth:`server.errors.APIError.body` gives it."""

    message: str
    type: str
    param: str | None
    code: str | None


class RealtimeError(ErrorBody):
    """Mirrors ``openai.types.realtime.realtime_error.RealtimeError``: an error's body and the
    client event at fault, if any."""

    event_id: str | None


class DurationUsage(TypedDict):
    """Mirrors ``conversation_item_input_audio_transcription_completed_event
    .UsageTranscriptTextUsageDuration``."""

    type: Literal["duration"]
    seconds: float


#: Token log-probabilities, as ``openai.types.realtime.log_prob_properties.LogProbProperties``
#: (``token``, ``logprob``, ``bytes``); :func:`server.api.formats.logprobs_body` builds them.
LogProbs = list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class ServerEvent:
    """A server event: its type name (``type``, per class) and a fresh ``event_id``."""

    type: ClassVar[str]
    #: Optional fields that are left out of the message when None, rather than sent as null.
    omitted_when_none: ClassVar[tuple[str, ...]] = ()

    event_id: str = field(default_factory=_event_id)

    def wire(self) -> dict[str, Any]:
        """The JSON object sent for this event.

        Returns:
            ``event_id``, ``type`` and the event's fields, in the order they are declared.
        """
        body: dict[str, Any] = {"event_id": self.event_id, "type": self.type}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "event_id" or (value is None and f.name in self.omitted_when_none):
                continue
            body[f.name] = value
        return body


# ---- the session ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SessionCreated(ServerEvent):
    """Mirrors ``openai.types.realtime.session_created_event.SessionCreatedEvent`` (GA)."""

    type: ClassVar[str] = "session.created"
    session: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class SessionUpdated(ServerEvent):
    """Mirrors ``openai.types.realtime.session_updated_event.SessionUpdatedEvent`` (GA)."""

    type: ClassVar[str] = "session.updated"
    session: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TranscriptionSessionCreated(ServerEvent):
    """The beta dialect's first event: ``SessionCreated`` with the beta session object (the
    SDK has no type of its own for it; its ``session`` is a ``TranscriptionSession``)."""

    type: ClassVar[str] = "transcription_session.created"
    session: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TranscriptionSessionUpdated(ServerEvent):
    """Mirrors ``openai.types.beta.realtime.transcription_session_updated_event
    .TranscriptionSessionUpdatedEvent``."""

    type: ClassVar[str] = "transcription_session.updated"
    session: dict[str, Any]


def session_created(dialect: Dialect, session: dict[str, Any]) -> ServerEvent:
    """The first event of a session, in ``dialect``.

    Args:
        session: The session object (:func:`server.realtime.session_config.session_body`).

    Returns:
        ``session.created`` (GA) or ``transcription_session.created`` (beta).
    """
    if dialect == "ga":
        return SessionCreated(session=session)
    return TranscriptionSessionCreated(session=session)


def session_updated(dialect: Dialect, session: dict[str, Any]) -> ServerEvent:
    """The answer to an update, in the dialect the update came in.

    Returns:
        ``session.updated`` (GA) or ``transcription_session.updated`` (beta).
    """
    if dialect == "ga":
        return SessionUpdated(session=session)
    return TranscriptionSessionUpdated(session=session)


# ---- the input audio buffer ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SpeechStarted(ServerEvent):
    """Mirrors ``openai.types.realtime.input_audio_buffer_speech_started_event
    .InputAudioBufferSpeechStartedEvent``."""

    type: ClassVar[str] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


@dataclass(frozen=True, kw_only=True)
class SpeechStopped(ServerEvent):
    """Mirrors ``openai.types.realtime.input_audio_buffer_speech_stopped_event
    .InputAudioBufferSpeechStoppedEvent``."""

    type: ClassVar[str] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


@dataclass(frozen=True, kw_only=True)
class BufferCommitted(ServerEvent):
    """Mirrors ``openai.types.realtime.input_audio_buffer_committed_event
    .InputAudioBufferCommittedEvent`` (``previous_item_id`` is sent, null for the first)."""

    type: ClassVar[str] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True, kw_only=True)
class BufferCleared(ServerEvent):
    """Mirrors ``openai.types.realtime.input_audio_buffer_cleared_event
    .InputAudioBufferClearedEvent``."""

    type: ClassVar[str] = "input_audio_buffer.cleared"


# ---- transcription ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TranscriptionDelta(ServerEvent):
    """Mirrors ``openai.types.realtime.conversation_item_input_audio_transcription_delta_event
    .ConversationItemInputAudioTranscriptionDeltaEvent`` (``logprobs`` only when asked for)."""

    type: ClassVar[str] = "conversation.item.input_audio_transcription.delta"
    omitted_when_none: ClassVar[tuple[str, ...]] = ("logprobs",)
    item_id: str
    content_index: int = 0
    delta: str
    logprobs: LogProbs | None = None


@dataclass(frozen=True, kw_only=True)
class TranscriptionCompleted(ServerEvent):
    """Mirrors ``openai.types.realtime.conversation_item_input_audio_transcription_completed_event
    .ConversationItemInputAudioTranscriptionCompletedEvent`` (``logprobs`` only when asked
    for). ``languages``: the item's languages, ``[{"code"}]``, detected per item when the
    session names none."""

    type: ClassVar[str] = "conversation.item.input_audio_transcription.completed"
    omitted_when_none: ClassVar[tuple[str, ...]] = ("logprobs",)
    item_id: str
    content_index: int = 0
    transcript: str
    usage: DurationUsage
    languages: list[dict[str, str]] = field(default_factory=list)
    logprobs: LogProbs | None = None


@dataclass(frozen=True, kw_only=True)
class TranscriptionFailed(ServerEvent):
    """Mirrors ``openai.types.realtime.conversation_item_input_audio_transcription_failed_event
    .ConversationItemInputAudioTranscriptionFailedEvent``."""

    type: ClassVar[str] = "conversation.item.input_audio_transcription.failed"
    item_id: str
    content_index: int = 0
    error: ErrorBody


# ---- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(ServerEvent):
    """Mirrors ``openai.types.realtime.realtime_error_event.RealtimeErrorEvent``."""

    type: ClassVar[str] = "error"
    error: RealtimeError

    @classmethod
    def of(cls, error: APIError, event_id: str | None = None) -> ErrorEvent:
        """The ``error`` event for any :class:`~server.errors.APIError`.

        Args:
            error: What went wrong.
            event_id: The client event at fault, if any (``error.event_id``).

        Returns:
            The event, its ``error`` the error's body and ``event_id``.
        """
        return cls(error={**error_body(error), "event_id": event_id})


def error_body(error: APIError) -> ErrorBody:
    """``error``'s body (``message``, ``type``, ``param``, ``code``), as events carry it."""
    body = error.body()["error"]
    return {
        "message": body["message"],
        "type": body["type"],
        "param": body["param"],
        "code": body["code"],
    }


__all__ = [
    "BufferCleared",
    "BufferCommitted",
    "DurationUsage",
    "ErrorBody",
    "ErrorEvent",
    "RealtimeError",
    "ServerEvent",
    "SessionCreated",
    "SessionUpdated",
    "SpeechStarted",
    "SpeechStopped",
    "TranscriptionCompleted",
    "TranscriptionDelta",
    "TranscriptionFailed",
    "TranscriptionSessionCreated",
    "TranscriptionSessionUpdated",
    "error_body",
    "new_id",
    "session_created",
    "session_updated",
]
