"""The OpenAI wire protocol: request fields as OpenAI's audio API defines them, response
models, and the error envelope.

Requests arrive as ``multipart/form-data``. OpenAI's clients spell list fields in several ways
(``timestamp_granularities[]`` repeated, ``timestamp_granularities`` repeated, a JSON string
for ``chunking_strategy`` or bracketed sub-fields ``chunking_strategy[type]``), so the form is
parsed here by hand into a typed :class:`TranscriptionRequest` rather than by FastAPI's
``Form`` parameters, and the OpenAPI schema is declared explicitly (see ``form_schema``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from server.api.formats import FormatSpec, ResponseFormat, format_spec, formats_where
from server.audio.upload import Upload
from server.errors import InvalidRequestError, quote
from server.languages import LanguageTag, language_codes, parse_language
from server.request import hotwords_of

Task = Literal["transcribe", "translate"]
GRANULARITIES = ("word", "segment")
INCLUDES = ("logprobs",)
#: Most ``known_speaker_references[]`` (OpenAI: "up to 4 speakers").
MAX_KNOWN_SPEAKERS = 4
#: Most speakers ``min_speakers``/``max_speakers`` may name.
MAX_SPEAKERS = 32
BY_CHANNEL = ("auto", "on", "off")
# Numbers as a form field may spell them: ASCII digits only. Python's int() and float() also
# take other scripts' digits ('٣'), underscores ('1_000'), 'nan' and 'infinity'.
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.I)


@dataclass(frozen=True)
class ChunkingStrategy:
    """OpenAI's ``chunking_strategy``: ``auto`` or a ``server_vad`` object. The server cuts long
    audio at pauses in either case; the VAD parameters tune faster-whisper's Silero VAD."""

    type: Literal["auto", "server_vad"] = "auto"
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None


@dataclass(frozen=True)
class TranscriptionRequest:
    """A parsed ``/v1/audio/transcriptions`` or ``/v1/audio/translations`` request.

    Mirrors OpenAI's fields (``file``, ``model``, ``language``, ``prompt``,
    ``response_format``, ``temperature``, ``timestamp_granularities[]``, ``stream``,
    ``chunking_strategy``, ``include[]``, ``keywords[]``, ``known_speaker_names[]``,
    ``known_speaker_references[]``, ``languages[]``) plus faster-whisper extras (``hotwords``,
    ``vad_filter``, ``beam_size``) and diarization extras (``min_speakers``, ``max_speakers``,
    ``diarize_by_channel``). ``keywords[]`` and ``hotwords`` are one mechanism: both end up in
    :attr:`hotwords`. ``known_speaker_references[]`` holds the bytes of each data URL, not yet
    decoded as audio.
    """

    task: Task
    file: Upload
    model: str
    language_tag: LanguageTag | None = None
    prompt: str | None = None
    response_format: ResponseFormat = ResponseFormat.JSON
    temperature: float = 0.0
    granularities: frozenset[str] = frozenset()
    stream: bool = False
    chunking_strategy: ChunkingStrategy | None = None
    hotwords: str | None = None
    vad_filter: bool = False
    beam_size: int | None = None
    include: frozenset[str] = frozenset()
    known_speaker_names: tuple[str, ...] = ()
    known_speaker_references: tuple[bytes, ...] = ()
    min_speakers: int | None = None
    max_speakers: int | None = None
    diarize_by_channel: Literal["auto", "on", "off"] = "auto"
    languages: tuple[str, ...] = ()

    @property
    def spec(self) -> FormatSpec:
        """The response format's spec: how the result is rendered and streamed."""
        return format_spec(self.response_format)

    @property
    def diarize(self) -> bool:
        """Whether the client asked who said what (a diarized format: ``diarized_json``)."""
        return self.spec.diarized

    @property
    def language(self) -> str | None:
        """Whisper's language code, or ``None`` to detect it."""
        return None if self.language_tag is None else self.language_tag.code

    @property
    def word_timestamps(self) -> bool:
        return "word" in self.granularities

    @property
    def logprobs(self) -> bool:
        return "logprobs" in self.include


# ---- parsing -----------------------------------------------------------------------------------


def _one(form: Mapping[str, Sequence[Any]], name: str) -> Any | None:
    values = form.get(name) or []
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequestError(
            f"'{name}' was sent {len(values)} times; send it once.", param=name
        )
    return values[0]


def _text(form: Mapping[str, Sequence[Any]], name: str, *, max_len: int = 256) -> str | None:
    value = _one(form, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be a text field, not a file.", param=name)
    if len(value) > max_len:
        raise InvalidRequestError(
            f"'{name}' is {len(value)} characters long; the limit is {max_len}.", param=name
        )
    return value


def _bool(form: Mapping[str, Sequence[Any]], name: str) -> bool | None:
    value = _text(form, name)
    if value is None or value == "":
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise InvalidRequestError(f"'{name}' must be true or false, got {quote(value)}.", param=name)


def parse_number(text: str, *, integer: bool = False) -> int | float | None:
    """A number written in ASCII decimal (``-2``, ``0.5``, ``1e-3``), or None if ``text`` is
    not one; whitespace around it is ignored.

    Args:
        text: The field as sent.
        integer: Accept whole numbers only (no point, no exponent).

    Returns:
        The number (it may be infinite: ``1e999``), or None.
    """
    text = text.strip(" \t\r\n")
    if not (_INTEGER if integer else _DECIMAL).match(text):
        return None
    if not integer:
        return float(text)
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (4300): out of any range
        return -math.inf if text.startswith("-") else math.inf


def _number(
    form: Mapping[str, Sequence[Any]], name: str, *, lo: float, hi: float, integer: bool = False
) -> float | None:
    value = _text(form, name)
    if value is None or value.strip() == "":
        return None
    number = parse_number(value, integer=integer)
    if number is None:
        kind = "a whole number" if integer else "a number"
        raise InvalidRequestError(
            f"'{name}' must be {kind} in ASCII digits, got {quote(value)}.", param=name
        )
    if not lo <= number <= hi:  # NaN and infinities are outside too
        raise InvalidRequestError(
            f"'{name}' must be between {lo:g} and {hi:g}, got {quote(value)}.", param=name
        )
    return number


def _list(form: Mapping[str, Sequence[Any]], name: str, *, commas: bool = True) -> list[str]:
    """A list field as OpenAI's clients send it: ``name[]`` or ``name`` repeated, or one JSON
    list of strings. With ``commas``, one field may also hold comma-separated values (and empty
    items are dropped); without, a field is one item whatever it holds (data URLs have commas),
    and every item is kept, so the caller can say what is wrong with an empty one."""
    values: list[str] = []
    for key in (f"{name}[]", name):
        for raw in form.get(key) or []:
            if not isinstance(raw, str):
                raise InvalidRequestError(f"'{name}[]' must be text.", param=name)
            text = raw.strip()
            items: Any = text.split(",") if commas else [text]
            if text.startswith("["):
                try:
                    items = json.loads(text)
                except (ValueError, RecursionError):
                    items = None
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    raise InvalidRequestError(
                        f"'{name}[]' must be text, repeated, or a JSON list of strings such as "
                        '["a", "b"].',
                        param=name,
                    ) from None
            elif not text and not commas:
                continue  # an empty field is no item, as with commas
            stripped = [item.strip() for item in items]
            values.extend(item for item in stripped if item or not commas)
    return values


def _choices(
    form: Mapping[str, Sequence[Any]], name: str, allowed: Sequence[str]
) -> frozenset[str]:
    values = _list(form, name)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        options = " and/or ".join(repr(a) for a in allowed)
        raise InvalidRequestError(
            f"Unknown {name} value {quote(unknown[0])}; use {options}.", param=name
        )
    return frozenset(values)


def _languages(form: Mapping[str, Sequence[Any]]) -> tuple[str, ...]:
    """``languages[]``: the languages detection may choose among, as Whisper's codes."""
    try:
        return language_codes(_list(form, "languages"))
    except InvalidRequestError as exc:
        raise InvalidRequestError(
            exc.message.replace("'language'", "'languages[]'"),
            param="languages",
            code="invalid_language",
        ) from None


def _keywords(
    form: Mapping[str, Sequence[Any]], hotwords: str | None, max_chars: int
) -> str | None:
    """``keywords[]`` and ``hotwords`` as the one hotwords string faster-whisper prompts with."""
    return hotwords_of(_list(form, "keywords"), hotwords, max_chars)


def _chunking(form: Mapping[str, Sequence[Any]]) -> ChunkingStrategy | None:
    raw = _text(form, "chunking_strategy", max_len=2000)
    fields: dict[str, Any] = {}
    if raw is not None and raw.strip():
        text = raw.strip()
        if text == "auto":
            return ChunkingStrategy("auto")
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidRequestError(
                "'chunking_strategy' must be \"auto\" or a JSON object such as "
                '{"type": "server_vad", "threshold": 0.5}.',
                param="chunking_strategy",
            ) from None
        if parsed == "auto":
            return ChunkingStrategy("auto")
        if not isinstance(parsed, dict):
            raise InvalidRequestError(
                "'chunking_strategy' must be \"auto\" or an object.", param="chunking_strategy"
            )
        fields = parsed
    else:
        prefix = "chunking_strategy["
        for key, values in form.items():
            if key.startswith(prefix) and key.endswith("]") and values:
                fields[key[len(prefix) : -1]] = values[-1]
        if not fields:
            return None
    kind = fields.get("type", "server_vad")
    if kind not in ("auto", "server_vad"):
        raise InvalidRequestError(
            f"chunking_strategy type must be 'auto' or 'server_vad', got {quote(kind)}.",
            param="chunking_strategy",
        )
    threshold = _vad_number(fields, "threshold", 0.0, 1.0)
    padding = _vad_number(fields, "prefix_padding_ms", 0, 10_000, integer=True)
    silence = _vad_number(fields, "silence_duration_ms", 0, 10_000, integer=True)
    return ChunkingStrategy(
        type=kind,
        threshold=threshold,
        prefix_padding_ms=None if padding is None else int(padding),
        silence_duration_ms=None if silence is None else int(silence),
    )


def _vad_number(
    fields: Mapping[str, Any], name: str, lo: float, hi: float, *, integer: bool = False
) -> float | None:
    """One number of a ``chunking_strategy`` object: a JSON number, or text in ASCII digits
    (the bracketed form fields are text)."""
    value = fields.get(name)
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, str):
        number = parse_number(value, integer=integer)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and (not integer or value.is_integer()):
        number = value
    kind = "a whole number" if integer else "a number"
    if number is None or not lo <= number <= hi:  # NaN and infinities are outside too
        raise InvalidRequestError(
            f"chunking_strategy {name} must be {kind} from {lo:g} to {hi:g}, got {quote(value)}.",
            param="chunking_strategy",
        )
    return number


def parse_form(
    form: Mapping[str, Sequence[Any]],
    *,
    task: Task,
    max_beam_size: int,
    max_prompt_chars: int,
) -> TranscriptionRequest:
    """Turn a multipart form (field name -> list of values) into a :class:`TranscriptionRequest`.

    Args:
        form: Every field with all its values; files as :class:`~server.audio.upload.Upload`.
        task: ``transcribe`` or ``translate`` (from the route).
        max_beam_size: Largest accepted ``beam_size``.
        max_prompt_chars: Longest accepted ``prompt``.

    Raises:
        InvalidRequestError: a field is missing, repeated, malformed or out of range.
    """
    upload = _one(form, "file")
    if upload is None:
        raise InvalidRequestError(
            "No 'file' field: send the audio as a multipart file field named 'file'.", param="file"
        )
    if not isinstance(upload, Upload):
        raise InvalidRequestError(
            "'file' must be an uploaded file (multipart file part), not a text field.",
            param="file",
        )
    model = _text(form, "model")
    if not model:
        raise InvalidRequestError(
            "No 'model' field: name a model, e.g. 'whisper-1' (see GET /v1/models).",
            param="model",
        )

    fmt_text = _text(form, "response_format") or "json"
    try:
        fmt = ResponseFormat(fmt_text)
    except ValueError:
        choices = ", ".join(f.value for f in ResponseFormat)
        raise InvalidRequestError(
            f"Unknown response_format {quote(fmt_text)}; use one of {choices}.",
            param="response_format",
        ) from None

    # What each format allows is its spec's (server.api.formats.FORMATS); the messages name
    # the formats that do allow what was sent.
    spec = format_spec(fmt)
    granularities = _choices(form, "timestamp_granularities", GRANULARITIES)
    if granularities and not spec.granularities:
        raise InvalidRequestError(
            f"timestamp_granularities[] needs response_format="
            f"{_formats(lambda s: s.granularities)} (got {fmt.value!r}).",
            param="timestamp_granularities",
        )

    language = None
    if task == "transcribe":
        language = parse_language(_text(form, "language"))
    stream = bool(_bool(form, "stream"))
    if stream and not spec.streamable:
        raise InvalidRequestError(
            "stream=true returns transcript.text.* events; use response_format "
            f"{_formats(lambda s: s.streamable)}.",
            param="stream",
        )
    include = _choices(form, "include", INCLUDES)
    if include and not spec.logprobs:
        raise InvalidRequestError(
            f"include[]=logprobs works only with response_format {_formats(lambda s: s.logprobs)}"
            f" (streamed or not), not with {fmt.value!r}.",
            param="include",
        )

    temperature = _number(form, "temperature", lo=0.0, hi=1.0)
    beam = _number(form, "beam_size", lo=1, hi=max_beam_size, integer=True)
    speakers = _speakers(form, spec, task)
    return TranscriptionRequest(
        task=task,
        file=upload,
        model=model,
        language_tag=language,
        prompt=_text(form, "prompt", max_len=max_prompt_chars) or None,
        response_format=fmt,
        temperature=0.0 if temperature is None else temperature,
        granularities=granularities,
        stream=stream,
        chunking_strategy=_chunking(form) if task == "transcribe" else None,
        hotwords=_keywords(
            form, _text(form, "hotwords", max_len=max_prompt_chars), max_prompt_chars
        ),
        vad_filter=bool(_bool(form, "vad_filter")),
        beam_size=None if beam is None else int(beam),
        include=include,
        languages=_languages(form),
        **speakers,
    )


def _data_url(url: str, index: int) -> bytes:
    """The bytes of a base64 ``data:`` URL (a known speaker's reference clip)."""
    param = "known_speaker_references"
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequestError(
            f"known_speaker_references[{index}] must be a base64 data URL of an audio clip, "
            "such as 'data:audio/wav;base64,UklGR...'.",
            param=param,
        )
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith(("audio/", "video/", "application/octet-stream")):
        raise InvalidRequestError(
            f"known_speaker_references[{index}] is a data URL of {quote(mime)}, not audio; send a "
            "2-10 s clip of the speaker's voice in any supported audio format.",
            param=param,
        )
    try:
        data = base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(
            f"known_speaker_references[{index}] is not valid base64 after 'base64,'.",
            param=param,
        ) from None
    if not data:
        raise InvalidRequestError(f"known_speaker_references[{index}] is empty.", param=param)
    return data


def _formats(rule: Callable[[FormatSpec], bool]) -> str:
    """The formats whose spec allows something, for a message: ``"json, text or srt"``."""
    names = [f.value for f in formats_where(rule)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _speakers(form: Mapping[str, Sequence[Any]], spec: FormatSpec, task: Task) -> dict[str, Any]:
    """The diarization fields, checked against each other and the response format."""
    names = _list(form, "known_speaker_names", commas=False)
    urls = _list(form, "known_speaker_references", commas=False)
    min_speakers = _number(form, "min_speakers", lo=1, hi=MAX_SPEAKERS, integer=True)
    max_speakers = _number(form, "max_speakers", lo=1, hi=MAX_SPEAKERS, integer=True)
    by_channel = _text(form, "diarize_by_channel")
    fmt = spec.format
    if task != "transcribe" and not spec.translations:
        raise InvalidRequestError(
            f"response_format={fmt.value} is for transcriptions; translations return "
            f"{_formats(lambda s: s.translations)}.",
            param="response_format",
        )
    given = [
        name
        for name, value in (
            ("known_speaker_names", names),
            ("known_speaker_references", urls),
            ("min_speakers", min_speakers),
            ("max_speakers", max_speakers),
            ("diarize_by_channel", by_channel),
        )
        if value
    ]
    if given and not spec.diarized:
        raise InvalidRequestError(
            f"'{given[0]}' is for speaker diarization; send it with "
            f"response_format={_formats(lambda s: s.diarized)} (got {fmt.value!r}).",
            param=given[0],
        )
    if len(urls) > MAX_KNOWN_SPEAKERS:
        raise InvalidRequestError(
            f"{len(urls)} known_speaker_references[] were sent; the limit is {MAX_KNOWN_SPEAKERS}.",
            param="known_speaker_references",
        )
    if len(names) != len(urls):
        raise InvalidRequestError(
            f"known_speaker_names[] has {len(names)} entries and known_speaker_references[] "
            f"{len(urls)}; send one name for each reference clip, in the same order.",
            param="known_speaker_names",
        )
    for name in names:
        if not name or len(name) > 64:
            raise InvalidRequestError(
                "Each known_speaker_names[] entry must be 1-64 characters.",
                param="known_speaker_names",
            )
    if len(set(names)) != len(names):
        raise InvalidRequestError(
            "known_speaker_names[] names someone twice; give each speaker one name.",
            param="known_speaker_names",
        )
    if min_speakers is not None and max_speakers is not None and min_speakers > max_speakers:
        raise InvalidRequestError(
            f"min_speakers ({min_speakers:g}) is more than max_speakers ({max_speakers:g}).",
            param="min_speakers",
        )
    mode = (by_channel or "auto").strip().lower()
    mode = {"true": "on", "false": "off"}.get(mode, mode)
    if mode not in BY_CHANNEL:
        raise InvalidRequestError(
            f"diarize_by_channel must be auto, on or off, got {quote(by_channel)}.",
            param="diarize_by_channel",
        )
    return {
        "known_speaker_names": tuple(names),
        "known_speaker_references": tuple(_data_url(u, i) for i, u in enumerate(urls)),
        "min_speakers": None if min_speakers is None else int(min_speakers),
        "max_speakers": None if max_speakers is None else int(max_speakers),
        "diarize_by_channel": mode,
    }


def form_schema(task: Task) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` for a transcription or translation route."""
    props: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "The audio file."},
        "model": {"type": "string", "description": "Model id or alias, e.g. whisper-1."},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": [f.value for f in ResponseFormat]},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    }
    if task == "transcribe":
        props |= {
            "language": {
                "type": "string",
                "description": "ISO-639-1 code or BCP-47 tag, e.g. en, zh, zh-CN, zh-TW.",
            },
            "languages[]": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Without language: the languages detection may choose among.",
            },
            "timestamp_granularities[]": {
                "type": "array",
                "items": {"type": "string", "enum": list(GRANULARITIES)},
            },
            "stream": {"type": "boolean"},
            "include[]": {"type": "array", "items": {"type": "string", "enum": list(INCLUDES)}},
            "keywords[]": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Words to favour (the same mechanism as hotwords).",
            },
            "chunking_strategy": {"type": "string", "description": '"auto" or a JSON object.'},
            "hotwords": {"type": "string", "description": "faster-whisper: words to favour."},
            "vad_filter": {"type": "boolean", "description": "faster-whisper: drop silence."},
            "beam_size": {"type": "integer", "minimum": 1},
            "known_speaker_names[]": {
                "type": "array",
                "items": {"type": "string"},
                "maxItems": MAX_KNOWN_SPEAKERS,
                "description": "diarized_json: names for the known_speaker_references[] clips.",
            },
            "known_speaker_references[]": {
                "type": "array",
                "items": {"type": "string"},
                "maxItems": MAX_KNOWN_SPEAKERS,
                "description": "diarized_json: data URLs of 2-10 s clips of each named voice.",
            },
            "min_speakers": {"type": "integer", "minimum": 1, "maximum": MAX_SPEAKERS},
            "max_speakers": {"type": "integer", "minimum": 1, "maximum": MAX_SPEAKERS},
            "diarize_by_channel": {
                "type": "string",
                "enum": list(BY_CHANNEL),
                "description": "diarized_json: channels are the speakers (auto: when they "
                "carry different voices).",
            },
        }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file", "model"], "properties": props}
                }
            },
        }
    }


# ---- responses ---------------------------------------------------------------------------------


class LoadedCopy(BaseModel):
    """Where a model is resident now (an extension of OpenAI's ``Model``; see
    ``GET /v1/memory`` for the same fields)."""

    device: str
    compute_type: str
    weights_bytes: int
    in_use: int
    pinned: bool
    idle_s: float
    unloads_in_s: float | None


class ModelCard(BaseModel):
    """OpenAI's ``Model`` object, with ``loaded``: its copies resident now (none: it is loaded
    on first use, or by ``POST /v1/models/{id}``)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    loaded: list[LoadedCopy] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, the body of every 4xx and 5xx."""

    error: ErrorDetail
