"""The response formats of OpenAI's ``/v1/audio/transcriptions`` and ``/v1/audio/translations``,
each one :class:`FormatSpec` in :data:`FORMATS`: its media type, whether it streams, which
options it allows, and its renderer; plus the SSE events of a streamed transcription. Pure
functions: no I/O, no model, no request state.

Adding a response format means adding its value to :class:`ResponseFormat`, writing its
renderer (``Transcript -> body``), and adding one :class:`FormatSpec` to :data:`FORMATS`;
nothing else. The form's checks (:func:`server.api.protocol.parse_form`'s 400s), whether a
request is diarized, the rendering and the streamed events all follow from the spec.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from server.languages import language_name
from server.transcript import Segment, TokenLogprob, Transcript

JSON_MEDIA_TYPE = "application/json"
# What OpenAI sends for text, srt and vtt.
TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"

# Times are rounded to the millisecond (what srt/vtt can show); decoder statistics keep more.
_TIME_DIGITS = 3
_STAT_DIGITS = 6


class ResponseFormat(StrEnum):
    """OpenAI's ``response_format`` values."""

    JSON = "json"
    TEXT = "text"
    SRT = "srt"
    VTT = "vtt"
    VERBOSE_JSON = "verbose_json"
    DIARIZED_JSON = "diarized_json"


Body = str | dict[str, Any]


class Rendered(NamedTuple):
    """A response body and its media type: a dict for the JSON formats, a str otherwise."""

    body: Body
    media_type: str


@dataclass(frozen=True)
class RenderOptions:
    """What a client asked of the body, beyond its format.

    Attributes:
        granularities: ``timestamp_granularities[]`` (``"segment"``, ``"word"``).
        logprobs: ``include[]=logprobs``.
    """

    granularities: frozenset[str] = frozenset()
    logprobs: bool = False


@dataclass(frozen=True)
class FormatSpec:
    """One ``response_format``: everything the server decides by it.

    Attributes:
        format: The ``response_format`` value.
        media_type: The response's content type.
        renderer: The finished transcript -> the body (a dict for JSON, a str otherwise).
        streamable: ``stream=true`` may ask for it (``transcript.text.*`` events).
        granularities: ``timestamp_granularities[]`` may be sent with it.
        logprobs: ``include[]=logprobs`` may be sent with it.
        diarized: It says who spoke: the diarization fields (``known_speaker_*``,
            ``min_speakers``, ``max_speakers``, ``diarize_by_channel``) may be sent with it,
            the engine diarizes the request, and each streamed delta names its segment,
            followed by the segment with its speaker.
        translations: ``/v1/audio/translations`` may ask for it.
    """

    format: ResponseFormat
    media_type: str
    renderer: Callable[[Transcript, RenderOptions], Body]
    streamable: bool = False
    granularities: bool = False
    logprobs: bool = False
    diarized: bool = False
    translations: bool = True

    def render(self, transcript: Transcript, options: RenderOptions | None = None) -> Rendered:
        """The body of a finished transcription in this format, and its media type."""
        return Rendered(self.renderer(transcript, options or RenderOptions()), self.media_type)

    def segment_events(self, segment: Segment, *, logprobs: bool = False) -> bytes:
        """A streamed segment's server-sent events: its text as a ``transcript.text.delta``
        (with its tokens' log-probabilities when asked for), and, diarized, the delta names its
        segment and the ``transcript.text.segment`` with its speaker follows (not for a
        segment without text)."""
        token_logprobs = (segment.logprobs or ()) if logprobs else None
        if not self.diarized:
            return sse(text_delta_event(segment.text, token_logprobs))
        delta = text_delta_event(segment.text, token_logprobs, segment=segment_id(segment))
        return sse(delta) + (sse(segment_event(segment)) if segment.text.strip() else b"")

    def done_event(self, transcript: Transcript, *, logprobs: bool = False) -> bytes:
        """A streamed transcription's last event: ``transcript.text.done``, with every token's
        log-probability when asked for and ``x_whisper_degraded`` when something was given
        up."""
        event = text_done_event(
            transcript.text,
            transcript.duration,
            transcript.logprobs if logprobs else None,
            languages=transcript.languages,
        )
        if transcript.degradations:
            event["x_whisper_degraded"] = degradations_body(transcript)
        return sse(event)


def format_spec(fmt: ResponseFormat | str) -> FormatSpec:
    """The spec of one response format.

    Raises:
        ValueError: ``fmt`` is not a :class:`ResponseFormat`.
    """
    return FORMATS[ResponseFormat(fmt)]


def formats_where(rule: Callable[[FormatSpec], bool]) -> list[ResponseFormat]:
    """The formats whose spec satisfies ``rule``, in :data:`FORMATS`' order (OpenAI's)."""
    return [spec.format for spec in FORMATS.values() if rule(spec)]


def render(
    transcript: Transcript,
    fmt: ResponseFormat | str,
    *,
    granularities: frozenset[str] = frozenset(),
    logprobs: bool = False,
) -> Rendered:
    """Render a transcript in one response format.

    Args:
        transcript: The finished transcription.
        fmt: The requested ``response_format``.
        granularities: ``timestamp_granularities[]`` (``"segment"``, ``"word"``); only
            ``verbose_json`` reads it.
        logprobs: ``include[]=logprobs``; only ``json`` reads it.

    Returns:
        The body and its media type.

    Raises:
        ValueError: ``fmt`` is not a :class:`ResponseFormat`; the router validates the field
            first, so this is a programming error.
    """
    return format_spec(fmt).render(transcript, RenderOptions(granularities, logprobs))


def usage_seconds(duration: float) -> int:
    """OpenAI's billed duration: whole seconds, rounded up (``usage.seconds``)."""
    # Round to the millisecond first so that 3.0000000001 s of float noise bills as 3, not 4.
    return max(0, math.ceil(round(duration, _TIME_DIGITS)))


def to_json(transcript: Transcript, *, logprobs: bool = False) -> dict[str, Any]:
    """``response_format=json``: ``{"text", "languages", "usage"}``, and ``logprobs``
    (``[{"token", "logprob", "bytes"}]`` for every emitted token) when asked for.
    ``languages`` is OpenAI's ``[{"code"}]``, in order of first appearance (empty when nothing
    was said)."""
    body: dict[str, Any] = {
        "text": transcript.text,
        "languages": languages_body(transcript.languages),
    }
    if logprobs:
        body["logprobs"] = logprobs_body(transcript.logprobs)
    body["usage"] = _usage(transcript.duration)
    return body


def languages_body(codes: tuple[str, ...]) -> list[dict[str, str]]:
    """OpenAI's ``languages`` list: ``[{"code": "en"}, ...]``."""
    return [{"code": code} for code in codes]


def logprobs_body(logprobs: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs`` list."""
    return [
        {"token": t.token, "logprob": round(t.logprob, _STAT_DIGITS), "bytes": list(t.bytes)}
        for t in logprobs
    ]


def to_text(transcript: Transcript) -> str:
    """``response_format=text``: the text and a newline."""
    return transcript.text + "\n"


def to_srt(transcript: Transcript) -> str:
    """``response_format=srt``: numbered cues with ``HH:MM:SS,mmm`` times.

    Segments with no text are left out (an empty cue would end the cue early for parsers),
    and the remaining cues are numbered from 1 without gaps. No segments gives ``""``.
    """
    cues = _cues(transcript.segments, lambda t: _timestamp(t, ","))
    return "".join(f"{i}\n{cue}\n\n" for i, cue in enumerate(cues, start=1))


def to_vtt(transcript: Transcript) -> str:
    """``response_format=vtt``: a ``WEBVTT`` header and cues with ``HH:MM:SS.mmm`` times.

    Segments with no text are left out; no segments gives just the header.
    """
    cues = _cues(transcript.segments, lambda t: _timestamp(t, "."))
    return "WEBVTT\n\n" + "".join(f"{cue}\n\n" for cue in cues)


def to_verbose_json(
    transcript: Transcript, granularities: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``response_format=verbose_json``, shaped like OpenAI's.

    Args:
        transcript: The finished transcription.
        granularities: ``"segment"`` and/or ``"word"``. ``segments`` is included when
            ``"segment"`` is asked for or nothing is (OpenAI's default); ``words`` only when
            ``"word"`` is asked for.

    Returns:
        ``task``, ``language`` (the English name; ``"english"`` for translations; with
        several languages, the one spoken longest), ``duration``, ``text``, ``segments``
        (each with the English name of the language it was spoken in, translations too)
        and/or ``words``, ``usage``, and
        ``x_whisper_degraded`` (``[{"kind", "reason"}]``) only when something was given up (the
        planner's degradations; fewer speakers than ``min_speakers``). OpenAI's clients ignore
        the unknown field.
    """
    language = "english" if transcript.task == "translate" else language_name(transcript.language)
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": language,
        "duration": round(transcript.duration, _TIME_DIGITS),
        "text": transcript.text,
    }
    if not granularities or "segment" in granularities:
        body["segments"] = [_segment(s, transcript.language) for s in transcript.segments]
    if "word" in granularities:
        body["words"] = [
            {
                "word": w.word.strip(),
                "start": round(w.start, _TIME_DIGITS),
                "end": round(w.end, _TIME_DIGITS),
            }
            for s in transcript.segments
            for w in s.words or ()
        ]
    body["usage"] = _usage(transcript.duration)
    if transcript.degradations:
        body["x_whisper_degraded"] = degradations_body(transcript)
    return body


def to_diarized_json(transcript: Transcript) -> dict[str, Any]:
    """``response_format=diarized_json``, shaped like OpenAI's ``TranscriptionDiarized``:
    ``task``, ``duration``, ``text``, ``segments`` (``transcript.text.segment`` objects with
    ``id``, ``start``, ``end``, ``speaker``, ``text`` and the ``language`` code; segments without
    text are left out),
    ``usage``, and ``x_whisper_degraded`` when something was given up (the planner's
    degradations; ``speakers``: fewer speakers than ``min_speakers`` asked for)."""
    body: dict[str, Any] = {
        "task": "transcribe",
        "duration": round(transcript.duration, _TIME_DIGITS),
        "text": transcript.text,
        "segments": [
            segment_event(s, transcript.language) for s in transcript.segments if s.text.strip()
        ],
        "usage": _usage(transcript.duration),
    }
    if transcript.degradations:
        body["x_whisper_degraded"] = degradations_body(transcript)
    return body


def segment_id(segment: Segment) -> str:
    """A diarized segment's ``id`` (OpenAI's are strings)."""
    return f"seg_{segment.id}"


def segment_event(segment: Segment, language: str | None = None) -> dict[str, Any]:
    """OpenAI's ``transcript.text.segment``: one speaker's stretch of text, in a
    ``diarized_json`` body and as a streamed event, with the code of the language it was
    spoken in (the segment's own, else ``language``) as an extra field."""
    event: dict[str, Any] = {
        "type": "transcript.text.segment",
        "id": segment_id(segment),
        "start": round(segment.start, _TIME_DIGITS),
        "end": round(segment.end, _TIME_DIGITS),
        "speaker": segment.speaker or "A",
        "text": segment.text.strip(),
    }
    if code := segment.language or language:
        event["language"] = code
    return event


def degradations_body(transcript: Transcript) -> list[dict[str, str]]:
    """What was given up (the memory planner's changes, a ``min_speakers`` not met), as the
    ``x_whisper_degraded`` extra field."""
    return [{"kind": kind, "reason": reason} for kind, reason in transcript.degradations]


# ---- streaming -------------------------------------------------------------------------------


def text_delta_event(
    delta: str,
    logprobs: tuple[TokenLogprob, ...] | None = None,
    *,
    segment: str | None = None,
) -> dict[str, Any]:
    """OpenAI's ``transcript.text.delta`` event: a piece of text as it is decoded, with the
    log-probabilities of its own tokens when they were asked for, and (diarized) the ``id`` of
    the segment it belongs to as ``segment_id``."""
    event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta}
    if logprobs is not None:
        event["logprobs"] = logprobs_body(logprobs)
    if segment is not None:
        event["segment_id"] = segment
    return event


def text_done_event(
    text: str,
    duration: float,
    logprobs: tuple[TokenLogprob, ...] | None = None,
    *,
    languages: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """OpenAI's ``transcript.text.done`` event: the whole text and the billed duration.

    Args:
        text: The full transcript text.
        duration: Length of the audio in seconds; rounded up to whole seconds in ``usage``.
        logprobs: Every token's log-probability, when they were asked for.
        languages: The languages spoken, as codes in order of first appearance
            (``languages: [{"code"}]``); None leaves the field out.
    """
    event: dict[str, Any] = {"type": "transcript.text.done", "text": text}
    if languages is not None:
        event["languages"] = languages_body(languages)
    if logprobs is not None:
        event["logprobs"] = logprobs_body(logprobs)
    event["usage"] = _usage(duration)
    return event


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line, UTF-8."""
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


# ---- the formats --------------------------------------------------------------------------

#: Every response format's spec, in the order OpenAI's reference lists them (the order in which
#: error messages name them).
FORMATS: Mapping[ResponseFormat, FormatSpec] = {
    spec.format: spec
    for spec in (
        FormatSpec(
            ResponseFormat.JSON,
            JSON_MEDIA_TYPE,
            lambda t, o: to_json(t, logprobs=o.logprobs),
            streamable=True,
            logprobs=True,
        ),
        FormatSpec(ResponseFormat.TEXT, TEXT_MEDIA_TYPE, lambda t, o: to_text(t), streamable=True),
        FormatSpec(ResponseFormat.SRT, TEXT_MEDIA_TYPE, lambda t, o: to_srt(t)),
        FormatSpec(
            ResponseFormat.VERBOSE_JSON,
            JSON_MEDIA_TYPE,
            lambda t, o: to_verbose_json(t, o.granularities),
            granularities=True,
        ),
        FormatSpec(ResponseFormat.VTT, TEXT_MEDIA_TYPE, lambda t, o: to_vtt(t)),
        FormatSpec(
            ResponseFormat.DIARIZED_JSON,
            JSON_MEDIA_TYPE,
            lambda t, o: to_diarized_json(t),
            streamable=True,
            diarized=True,
            translations=False,
        ),
    )
}
assert set(FORMATS) == set(ResponseFormat), "every response format needs its FormatSpec"


# ---- helpers ---------------------------------------------------------------------------------


def _usage(duration: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": usage_seconds(duration)}


def _segment(s: Segment, language: str) -> dict[str, Any]:
    return {
        "id": s.id,
        "seek": s.seek,
        "start": round(s.start, _TIME_DIGITS),
        "end": round(s.end, _TIME_DIGITS),
        "text": s.text,
        "tokens": list(s.tokens),
        "temperature": s.temperature,
        "avg_logprob": round(s.avg_logprob, _STAT_DIGITS),
        "compression_ratio": round(s.compression_ratio, _STAT_DIGITS),
        "no_speech_prob": round(s.no_speech_prob, _STAT_DIGITS),
        "language": language_name(s.language or language),
    }


def _cues(segments: tuple[Segment, ...], stamp: Callable[[float], str]) -> list[str]:
    """``"<start> --> <end>\\n<text>"`` for each segment that has text."""
    return [
        f"{stamp(s.start)} --> {stamp(s.end)}\n{s.text.strip()}" for s in segments if s.text.strip()
    ]


def _timestamp(seconds: float, decimal_marker: str) -> str:
    """``HH:MM:SS<marker>mmm``; hours keep counting past 99."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"
