"""Parsing the multipart form into a request: the fields OpenAI added (``include[]``,
``keywords[]``) and language tags, in every spelling clients send."""

from __future__ import annotations

from typing import Any

import pytest

from server.api.protocol import TranscriptionRequest, parse_form, parse_number
from server.audio.upload import Upload
from server.errors import QUOTE_CHARS, InvalidRequestError, quote
from server.request import MAX_KEYWORDS


def _parse(task: str = "transcribe", **fields: Any) -> TranscriptionRequest:
    form: dict[str, list[Any]] = {"file": [Upload(b"RIFF")], "model": ["whisper-1"]}
    for name, value in fields.items():
        form[name.replace("__", "[]")] = value if isinstance(value, list) else [value]
    return parse_form(form, task=task, max_beam_size=10, max_prompt_chars=200)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"include__": "logprobs"},
        {"include": "logprobs"},
        {"include__": '["logprobs"]'},
        {"include__": ["logprobs", "logprobs"]},
    ],
)
def test_include_spellings(fields: dict[str, Any]) -> None:
    req = _parse(**fields)
    assert req.include == {"logprobs"} and req.logprobs


def test_include_with_streaming_json() -> None:
    assert _parse(include__="logprobs", stream="true").logprobs


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt", "verbose_json"])
def test_include_needs_json(fmt: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _parse(include__="logprobs", response_format=fmt)
    assert info.value.param == "include" and info.value.status == 400
    assert "json" in info.value.message


def test_unknown_include_value() -> None:
    with pytest.raises(InvalidRequestError) as info:
        _parse(include__="tokens")
    assert info.value.param == "include"


@pytest.mark.parametrize(
    ("fields", "hotwords"),
    [
        ({"keywords__": ["ComfyUI", "Kubernetes"]}, "ComfyUI Kubernetes"),
        ({"keywords": ["ComfyUI", "Kubernetes"]}, "ComfyUI Kubernetes"),
        ({"keywords__": '["ComfyUI", "Kubernetes"]'}, "ComfyUI Kubernetes"),
        ({"keywords__": "ComfyUI, Kubernetes"}, "ComfyUI Kubernetes"),
        ({"keywords__": "ComfyUI", "hotwords": "Kubernetes"}, "ComfyUI Kubernetes"),
        ({"hotwords": "Kubernetes"}, "Kubernetes"),
        ({}, None),
    ],
)
def test_keywords_feed_hotwords(fields: dict[str, Any], hotwords: str | None) -> None:
    assert _parse(**fields).hotwords == hotwords


def test_keywords_limits() -> None:
    with pytest.raises(InvalidRequestError) as info:
        _parse(keywords__=[f"w{i}" for i in range(MAX_KEYWORDS + 1)])
    assert info.value.param == "keywords"
    with pytest.raises(InvalidRequestError) as info:
        _parse(keywords__=["x" * 150, "y" * 60])
    assert info.value.param == "keywords"


def test_language_tag_is_kept() -> None:
    req = _parse(language="zh-TW")
    assert req.language == "zh"
    assert req.language_tag is not None and req.language_tag.script == "traditional"
    assert _parse(language="en-US").language == "en"
    assert _parse().language is None
    # translations ignore the field, as before
    assert _parse("translate", language="zh-TW").language_tag is None


# ---- numbers and quoting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "integer", "expected"),
    [
        ("3", True, 3),
        (" -2 ", True, -2),
        ("+4", True, 4),
        ("0.5", False, 0.5),
        (".5", False, 0.5),
        ("1e-3", False, 0.001),
        ("2", False, 2.0),
        ("2.0", True, None),
        ("1e3", True, None),
        ("\u0663", True, None),  # ARABIC-INDIC DIGIT THREE: int() gives 3
        ("\u0661", False, None),  # ARABIC-INDIC DIGIT ONE: float() gives 1.0
        ("\uff13", True, None),  # FULLWIDTH DIGIT THREE
        ("\u0660.\u0665", False, None),
        ("1_000", True, None),
        ("0_5", False, None),
        ("nan", False, None),
        ("inf", False, None),
        ("-Infinity", False, None),
        ("0x10", True, None),
        ("", False, None),
        ("1\n", True, 1),
        ("1\n2", True, None),
    ],
)
def test_numbers_are_ascii_decimal(text: str, integer: bool, expected: float | None) -> None:
    assert parse_number(text, integer=integer) == expected


def test_a_number_too_long_to_convert_is_out_of_range() -> None:
    assert parse_number("9" * 5000, integer=True) == float("inf")
    assert parse_number("-" + "9" * 5000, integer=True) == float("-inf")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "\u0661"}, "temperature"),
        ({"beam_size": "\u0663"}, "beam_size"),
        ({"beam_size": "1_0"}, "beam_size"),
        ({"response_format": "diarized_json", "max_speakers": "\u0663"}, "max_speakers"),
        ({"chunking_strategy": '{"type": "server_vad", "threshold": "\u0660.\u0665"}'}, None),
        ({"chunking_strategy": '{"type": "server_vad", "threshold": true}'}, None),
        ({"chunking_strategy": '{"type": "server_vad", "silence_duration_ms": 500.5}'}, None),
        ({"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "NaN"}, None),
    ],
)
def test_non_ascii_and_odd_numbers_are_400s(fields: dict[str, str], param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _parse(**fields)
    assert info.value.param == (param or "chunking_strategy")


def test_numbers_in_json_and_text_spellings() -> None:
    req = _parse(
        chunking_strategy='{"type": "server_vad", "threshold": 0.25, '
        '"prefix_padding_ms": 300.0, "silence_duration_ms": "250"}'
    )
    assert req.chunking_strategy is not None
    assert req.chunking_strategy.threshold == 0.25
    assert req.chunking_strategy.prefix_padding_ms == 300
    assert req.chunking_strategy.silence_duration_ms == 250
    assert _parse(temperature=" 0.5 ", beam_size="3").beam_size == 3


def test_quote_cuts_a_long_value_to_its_start() -> None:
    assert quote("en-XX") == "'en-XX'"
    long = "x" * 5000
    quoted = quote(long)
    assert quoted.startswith("'" + "x" * QUOTE_CHARS + "'") and "(5000 characters)" in quoted
    assert len(quoted) < QUOTE_CHARS + 40


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": "9" * 250},
        {"beam_size": "9" * 250},
        {"response_format": "f" * 250},
        {"language": "q" * 250},
        {"stream": "s" * 250},
        {"include__": "i" * 5000},
        {"chunking_strategy": '{"type": "' + "t" * 1900 + '"}'},
        {"chunking_strategy": '{"type": "server_vad", "threshold": "' + "9" * 1900 + '"}'},
        {"response_format": "diarized_json", "diarize_by_channel": "d" * 250},
    ],
)
def test_error_messages_quote_only_the_start_of_a_value(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _parse(**fields)
    message = info.value.message
    assert not any(c * (QUOTE_CHARS + 1) in message for c in "9fqsitd"), message
