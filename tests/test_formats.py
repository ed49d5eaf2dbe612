from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from server.api.formats import (
    JSON_MEDIA_TYPE,
    TEXT_MEDIA_TYPE,
    ResponseFormat,
    format_spec,
    render,
    sse,
    text_delta_event,
    text_done_event,
    to_srt,
    to_text,
    to_verbose_json,
    to_vtt,
    usage_seconds,
)
from server.chinese import convert_transcript
from server.transcript import Segment, TokenLogprob, Transcript, Word

FORMATS_JSON = format_spec("json")

ENGLISH = Transcript(
    task="transcribe",
    language="en",
    duration=3725.4,
    segments=(
        Segment(
            id=0,
            seek=0,
            start=0.0,
            end=2.5,
            text=" Hello world.",
            tokens=(50364, 2425, 1002, 13),
            temperature=0.0,
            avg_logprob=-0.25123456789,
            compression_ratio=0.8,
            no_speech_prob=0.01,
            words=(Word(" Hello", 0.0, 1.2, 0.9), Word(" world.", 1.2, 2.5, 0.8)),
        ),
        Segment(
            id=1,
            seek=372000,
            start=3723.0024,
            end=3725.4,
            text=" Bye.",
            tokens=(3158, 13),
            temperature=0.2,
            words=(Word(" Bye.", 3723.0024, 3725.4, 0.7),),
        ),
    ),
)

CHINESE = Transcript(
    task="transcribe",
    language="zh",
    duration=4.0,
    segments=(
        Segment(
            id=0,
            seek=0,
            start=0.0,
            end=1.5,
            text="你好，",
            words=(Word("你好，", 0.0, 1.5),),
        ),
        Segment(
            id=1,
            seek=0,
            start=1.5,
            end=3.25,
            text="世界。",
            words=(Word("世界。", 1.5, 3.25),),
        ),
    ),
)

EMPTY = Transcript(task="transcribe", language="en", duration=0.0, segments=())


# ---- json / text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transcript", "body"),
    [
        (
            ENGLISH,
            {
                "text": "Hello world. Bye.",
                "languages": [{"code": "en"}],
                "usage": {"type": "duration", "seconds": 3726},
            },
        ),
        (
            CHINESE,
            {
                "text": "你好，世界。",
                "languages": [{"code": "zh"}],
                "usage": {"type": "duration", "seconds": 4},
            },
        ),
        (EMPTY, {"text": "", "languages": [], "usage": {"type": "duration", "seconds": 0}}),
    ],
)
def test_json(transcript: Transcript, body: dict[str, Any]) -> None:
    assert render(transcript, ResponseFormat.JSON) == (body, JSON_MEDIA_TYPE)


@pytest.mark.parametrize(
    ("transcript", "text"),
    [(ENGLISH, "Hello world. Bye.\n"), (CHINESE, "你好，世界。\n"), (EMPTY, "\n")],
)
def test_text(transcript: Transcript, text: str) -> None:
    assert render(transcript, "text") == (text, TEXT_MEDIA_TYPE)
    assert to_text(transcript) == text


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [(0.0, 0), (0.2, 1), (3.0, 3), (3.0000000001, 3), (3.001, 4), (59.9, 60)],
)
def test_usage_seconds_rounds_up_to_whole_seconds(duration: float, seconds: int) -> None:
    assert usage_seconds(duration) == seconds


# ---- srt / vtt -------------------------------------------------------------------------------


SRT_ENGLISH = (
    "1\n00:00:00,000 --> 00:00:02,500\nHello world.\n\n2\n01:02:03,002 --> 01:02:05,400\nBye.\n\n"
)
VTT_ENGLISH = (
    "WEBVTT\n\n"
    "00:00:00.000 --> 00:00:02.500\nHello world.\n\n"
    "01:02:03.002 --> 01:02:05.400\nBye.\n\n"
)


@pytest.mark.parametrize(
    ("transcript", "fmt", "document"),
    [
        (ENGLISH, ResponseFormat.SRT, SRT_ENGLISH),
        (ENGLISH, ResponseFormat.VTT, VTT_ENGLISH),
        (
            CHINESE,
            ResponseFormat.SRT,
            "1\n00:00:00,000 --> 00:00:01,500\n你好，\n\n2\n00:00:01,500 --> 00:00:03,250\n世界。\n\n",
        ),
        (
            CHINESE,
            ResponseFormat.VTT,
            (
                "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n你好，\n\n"
                "00:00:01.500 --> 00:00:03.250\n世界。\n\n"
            ),
        ),
        (EMPTY, ResponseFormat.SRT, ""),
        (EMPTY, ResponseFormat.VTT, "WEBVTT\n\n"),
    ],
)
def test_subtitles(transcript: Transcript, fmt: ResponseFormat, document: str) -> None:
    assert render(transcript, fmt) == (document, TEXT_MEDIA_TYPE)


def test_subtitles_skip_blank_segments_and_number_without_gaps() -> None:
    blank = Segment(id=1, seek=0, start=2.5, end=3.0, text="  ")
    transcript = dataclasses.replace(
        ENGLISH, segments=(ENGLISH.segments[0], blank, ENGLISH.segments[1])
    )
    assert to_srt(transcript) == SRT_ENGLISH
    assert to_vtt(transcript) == VTT_ENGLISH


def test_timestamps_past_99_hours() -> None:
    seg = Segment(id=0, seek=0, start=360000.0, end=360000.9996, text="late")
    transcript = Transcript(task="transcribe", language="en", duration=0.0, segments=(seg,))
    assert "100:00:00,000 --> 100:00:01,000" in to_srt(transcript)


# ---- verbose_json ----------------------------------------------------------------------------


ENGLISH_SEGMENTS = [
    {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": 2.5,
        "text": " Hello world.",
        "tokens": [50364, 2425, 1002, 13],
        "temperature": 0.0,
        "avg_logprob": -0.251235,
        "compression_ratio": 0.8,
        "no_speech_prob": 0.01,
        "language": "english",
    },
    {
        "id": 1,
        "seek": 372000,
        "start": 3723.002,  # rounded to the millisecond
        "end": 3725.4,
        "text": " Bye.",
        "tokens": [3158, 13],
        "temperature": 0.2,
        "avg_logprob": 0.0,
        "compression_ratio": 0.0,
        "no_speech_prob": 0.0,
        "language": "english",
    },
]
ENGLISH_WORDS = [
    {"word": "Hello", "start": 0.0, "end": 1.2},
    {"word": "world.", "start": 1.2, "end": 2.5},
    {"word": "Bye.", "start": 3723.002, "end": 3725.4},
]


@pytest.mark.parametrize(
    ("granularities", "segments", "words"),
    [
        (frozenset(), ENGLISH_SEGMENTS, None),
        (frozenset({"segment"}), ENGLISH_SEGMENTS, None),
        (frozenset({"word"}), None, ENGLISH_WORDS),
        (frozenset({"word", "segment"}), ENGLISH_SEGMENTS, ENGLISH_WORDS),
    ],
)
def test_verbose_json_granularities(
    granularities: frozenset[str],
    segments: list[dict[str, Any]] | None,
    words: list[dict[str, Any]] | None,
) -> None:
    body, media_type = render(ENGLISH, "verbose_json", granularities=granularities)
    assert media_type == JSON_MEDIA_TYPE
    expected: dict[str, Any] = {
        "task": "transcribe",
        "language": "english",
        "duration": 3725.4,
        "text": "Hello world. Bye.",
    }
    if segments is not None:
        expected["segments"] = segments
    if words is not None:
        expected["words"] = words
    expected["usage"] = {"type": "duration", "seconds": 3726}
    assert body == expected


def test_verbose_json_chinese() -> None:
    body = to_verbose_json(CHINESE, frozenset({"word"}))
    assert body["language"] == "chinese"
    assert body["text"] == "你好，世界。"
    assert [w["word"] for w in body["words"]] == ["你好，", "世界。"]
    # Serialises as real UTF-8 JSON.
    assert "你好" in json.dumps(body, ensure_ascii=False)


def test_verbose_json_translation_reports_english() -> None:
    translated = dataclasses.replace(ENGLISH, task="translate", language="ja")
    body = to_verbose_json(translated)
    assert body["task"] == "translate"
    assert body["language"] == "english"


def test_verbose_json_cantonese_name() -> None:
    assert to_verbose_json(dataclasses.replace(CHINESE, language="yue"))["language"] == "cantonese"


def test_verbose_json_words_without_word_timestamps() -> None:
    no_words = dataclasses.replace(
        ENGLISH,
        segments=tuple(dataclasses.replace(s, words=None) for s in ENGLISH.segments),
    )
    assert to_verbose_json(no_words, frozenset({"word"}))["words"] == []


def test_verbose_json_empty() -> None:
    body = to_verbose_json(EMPTY, frozenset({"word", "segment"}))
    assert body["text"] == ""
    assert body["segments"] == []
    assert body["words"] == []
    assert body["usage"] == {"type": "duration", "seconds": 0}


@pytest.mark.parametrize(
    ("degradations", "expected"),
    [
        ((), None),
        (
            (
                ("compute_type", "int8_float16 -> int8: 1.2 GiB free"),
                ("batch_size", "16 -> 4"),
            ),
            [
                {
                    "kind": "compute_type",
                    "reason": "int8_float16 -> int8: 1.2 GiB free",
                },
                {"kind": "batch_size", "reason": "16 -> 4"},
            ],
        ),
    ],
)
def test_verbose_json_degradations(
    degradations: tuple[tuple[str, str], ...], expected: list[dict[str, str]] | None
) -> None:
    body = to_verbose_json(dataclasses.replace(ENGLISH, degradations=degradations))
    assert body.get("x_whisper_degraded") == expected
    assert ("x_whisper_degraded" in body) == bool(degradations)


def test_degradations_only_in_verbose_json() -> None:
    degraded = dataclasses.replace(ENGLISH, degradations=(("device", "cuda -> cpu"),))
    body, _ = render(degraded, ResponseFormat.JSON)
    assert body == {
        "text": "Hello world. Bye.",
        "languages": [{"code": "en"}],
        "usage": {"type": "duration", "seconds": 3726},
    }


MIXED = Transcript(
    task="transcribe",
    language="de",  # spoken longest
    duration=9.0,
    segments=(
        Segment(0, 0, 0.0, 2.0, " Hello.", language="en"),
        Segment(1, 0, 2.5, 6.0, " Guten Tag.", language="de"),
        Segment(2, 0, 6.0, 6.5, " ", language="fr"),  # no text: no language
        Segment(3, 0, 6.5, 7.5, "頭髮", language="zh"),
        Segment(4, 0, 7.5, 9.0, " Bye.", language="en"),
    ),
)


def test_several_languages_in_every_json_format() -> None:
    assert render(MIXED, "json")[0]["languages"] == [{"code": c} for c in ("en", "de", "zh")]
    verbose = render(MIXED, "verbose_json")[0]
    assert verbose["language"] == "german"
    assert [s["language"] for s in verbose["segments"]] == [
        "english",
        "german",
        "french",
        "chinese",
        "english",
    ]
    diarized = render(MIXED, "diarized_json")[0]
    assert [s["language"] for s in diarized["segments"]] == ["en", "de", "zh", "en"]
    done = json.loads(FORMATS_JSON.done_event(MIXED).decode()[len("data: ") :])
    assert done["languages"] == [{"code": c} for c in ("en", "de", "zh")]
    # A segment with no language of its own is in the transcript's.
    assert render(ENGLISH, "diarized_json")[0]["segments"][0]["language"] == "en"
    # srt and vtt are unchanged by languages.
    plain = dataclasses.replace(
        MIXED, segments=tuple(dataclasses.replace(s, language=None) for s in MIXED.segments)
    )
    assert to_srt(MIXED) == to_srt(plain) and to_vtt(MIXED) == to_vtt(plain)


def test_only_chinese_segments_are_converted() -> None:
    converted = convert_transcript(MIXED, "s2tw")
    assert [s.text for s in converted.segments] == [
        s.text for s in MIXED.segments
    ]  # 頭髮 is traditional already
    simplified = convert_transcript(MIXED, "tw2s")
    assert simplified.segments[3].text == "头发"
    assert [s.text for i, s in enumerate(simplified.segments) if i != 3] == [
        s.text for i, s in enumerate(MIXED.segments) if i != 3
    ]


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError):
        render(ENGLISH, "docx")


# ---- streaming -------------------------------------------------------------------------------


def test_stream_events() -> None:
    assert text_delta_event(" Hello") == {
        "type": "transcript.text.delta",
        "delta": " Hello",
    }
    assert text_done_event("Hello world.", 2.2) == {
        "type": "transcript.text.done",
        "text": "Hello world.",
        "usage": {"type": "duration", "seconds": 3},
    }


def test_sse_frames_one_utf8_json_event() -> None:
    frame = sse(text_delta_event("你好"))
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2
    assert json.loads(frame[len(b"data: ") :].decode()) == {
        "type": "transcript.text.delta",
        "delta": "你好",
    }


def test_logprobs_in_json_and_stream_events() -> None:
    hello = TokenLogprob(" Hello", -0.1234567, tuple(b" Hello"))
    world = TokenLogprob(" world", -2.0, tuple(b" world"))
    transcript = Transcript(
        "transcribe",
        "en",
        2.2,
        (
            Segment(0, 0, 0.0, 1.0, " Hello", logprobs=(hello,)),
            Segment(1, 0, 1.0, 2.0, " world", logprobs=(world,)),
        ),
    )
    expected = [
        {"token": " Hello", "logprob": -0.123457, "bytes": [32, 72, 101, 108, 108, 111]},
        {"token": " world", "logprob": -2.0, "bytes": [32, 119, 111, 114, 108, 100]},
    ]
    body, _ = render(transcript, "json", logprobs=True)
    assert body == {
        "text": "Hello world",
        "languages": [{"code": "en"}],
        "logprobs": expected,
        "usage": {"type": "duration", "seconds": 3},
    }
    assert "logprobs" not in render(transcript, "json")[0]
    assert "logprobs" not in render(transcript, "verbose_json", logprobs=True)[0]
    assert text_delta_event(" Hello", (hello,))["logprobs"] == expected[:1]
    assert text_done_event("Hello world", 2.2, transcript.logprobs)["logprobs"] == expected
