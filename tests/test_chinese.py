"""Chinese script conversion: which OpenCC configuration a request gets, and what is converted
(text, words; times, tokens and statistics untouched; translations and other languages left
alone). The conversion itself is OpenCC's, run for real."""

from __future__ import annotations

import threading

import pytest

from server.chinese import convert_segment, convert_transcript, converter, target
from server.languages import parse_language
from server.transcript import Segment, TokenLogprob, Transcript, Word

TRADITIONAL = "廣州市房地產中介協會分析"
SIMPLIFIED = "广州市房地产中介协会分析"


@pytest.mark.parametrize(
    ("language", "default", "config"),
    [
        ("zh-CN", "traditional", "tw2s"),
        ("zh-SG", "model", "tw2s"),
        ("zh-Hans", "traditional", "tw2s"),
        ("zh-TW", "simplified", "s2tw"),
        ("zh-HK", "simplified", "s2hk"),
        ("zh-MO", "simplified", "s2hk"),
        ("zh-Hant", "model", "s2tw"),
        ("zh", "simplified", "tw2s"),
        ("zh", "traditional", "s2tw"),
        ("zh", "model", None),
        (None, "simplified", "tw2s"),  # detected Chinese follows the default
        (None, "model", None),
        ("en", "simplified", None),
        ("yue", "simplified", None),  # Cantonese is left as Whisper writes it
    ],
)
def test_target(language: str | None, default: str, config: str | None) -> None:
    assert target(parse_language(language), default) == config  # type: ignore[arg-type]


def _segment() -> Segment:
    return Segment(
        id=0,
        seek=0,
        start=0.5,
        end=3.25,
        text=" " + TRADITIONAL,
        tokens=(1, 2, 3),
        avg_logprob=-0.3,
        words=(Word(" 廣州市", 0.5, 1.1, 0.9), Word("房地產", 1.1, 2.0, 0.8)),
        logprobs=(TokenLogprob("廣", -0.1, tuple("廣".encode())),),
    )


def test_convert_segment_keeps_times_tokens_and_logprobs() -> None:
    converted = convert_segment(_segment(), "tw2s")
    assert converted.text == " " + SIMPLIFIED
    assert [(w.word, w.start, w.end, w.probability) for w in converted.words or ()] == [
        (" 广州市", 0.5, 1.1, 0.9),
        ("房地产", 1.1, 2.0, 0.8),
    ]
    original = _segment()
    assert (converted.start, converted.end, converted.tokens, converted.avg_logprob) == (
        original.start,
        original.end,
        original.tokens,
        original.avg_logprob,
    )
    # log-probabilities are the model's own tokens
    assert converted.logprobs == original.logprobs
    assert convert_segment(original, None) is original


def test_convert_to_taiwan_traditional() -> None:
    simplified = Segment(0, 0, 0.0, 1.0, "头发和面条都很干净")
    assert convert_segment(simplified, "s2tw").text == "頭髮和麵條都很乾淨"
    # Whisper's Taiwan-style 著 becomes simplified too
    assert convert_segment(Segment(0, 0, 0.0, 1.0, "他看著我"), "tw2s").text == "他看着我"


def test_a_phrase_across_words_converts_as_a_phrase() -> None:
    """头|发 alone would be 頭|發 (發 as in 發展); together they are 頭髮 (hair)."""
    words = (Word("剪", 0.0, 0.3), Word("头", 0.3, 0.6), Word("发", 0.6, 0.9))
    converted = convert_segment(Segment(0, 0, 0.0, 0.9, "剪头发", words=words), "s2tw")
    assert converted.text == "剪頭髮"
    assert [(w.word, w.start, w.end) for w in converted.words or ()] == [
        ("剪", 0.0, 0.3),
        ("頭", 0.3, 0.6),
        ("髮", 0.6, 0.9),
    ]


def test_convert_transcript_only_chinese_transcriptions() -> None:
    zh = Transcript("transcribe", "zh", 3.25, (_segment(),))
    assert convert_transcript(zh, "tw2s").text == SIMPLIFIED
    for other in (
        Transcript("transcribe", "ja", 3.25, (_segment(),)),
        Transcript("translate", "zh", 3.25, (_segment(),)),
    ):
        assert convert_transcript(other, "tw2s") is other
    assert convert_transcript(zh, None) is zh


def test_one_converter_serves_many_threads() -> None:
    convert = converter("tw2s")
    assert converter("tw2s") is convert
    results: list[str] = []

    def work() -> None:
        for _ in range(200):
            results.append(convert(TRADITIONAL))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {SIMPLIFIED}
