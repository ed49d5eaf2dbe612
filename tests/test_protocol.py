"""Parsing the multipart form into a request: the fields OpenAI added (``include[]``,
``keywords[]``) and language tags, in every spelling clients send."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import InvalidRequestError
from server.protocol import MAX_KEYWORDS, TranscriptionRequest, parse_form
from server.upload import Upload


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
