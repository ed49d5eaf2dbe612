"""Chinese in the script the client asked for.

Whisper writes Mandarin in simplified or traditional characters, often in traditional for
mainland speech. A client says which it wants with the ``language`` tag (``zh-CN`` simplified,
``zh-TW`` traditional; see :func:`server.languages.parse_language`), or the operator's
``WHISPER_CHINESE_SCRIPT`` decides for bare ``zh`` and detected Chinese. The text is converted
with OpenCC's dictionaries (phrases first, then characters), after decoding: the segment text
and its words (each keeps its times), and so everything rendered from them.
Token log-probabilities keep the model's own tokens.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from typing import Any

from server.languages import ChineseScript, LanguageTag
from server.transcript import Segment, Transcript, Word

#: OpenCC configurations by (script, region). Simplified from Taiwan-style traditional, which is
#: what Whisper writes (``t2s`` would leave 著 in 看著); traditional in Taiwan's forms, or in Hong
#: Kong's for HK and Macau. OpenCC's generic ``s2t`` is avoided: its standard glyphs (爲, 裏, 麪)
#: are printed in neither place. ``bench/chinese_script.py`` measured the choice.
_CONFIGS = {
    ("simplified", None): "tw2s",
    ("traditional", None): "s2tw",
    ("traditional", "tw"): "s2tw",
    ("traditional", "hk"): "s2hk",
    ("traditional", "mo"): "s2hk",
}


def target(tag: LanguageTag | None, default: ChineseScript) -> str | None:
    """The OpenCC configuration for Chinese output of a request.

    Args:
        tag: The request's ``language``; ``None`` when the language is detected.
        default: ``WHISPER_CHINESE_SCRIPT``, for bare ``zh`` and detected Chinese.

    Returns:
        ``"tw2s"``, ``"s2tw"`` or ``"s2hk"``; ``None`` to leave the text alone
        (``model``, or a language other than Chinese named in the tag).
    """
    if tag is not None and tag.code != "zh":
        return None
    script = tag.script if tag is not None and tag.script is not None else default
    if script == "model":
        return None
    region = tag.region if tag is not None and script == "traditional" else None
    return _CONFIGS.get((script, region), _CONFIGS[(script, None)])


class _Converter:
    """One OpenCC converter. Its dictionaries load once, and one instance serves every thread
    (the binding's ``convert`` is const over immutable dictionaries)."""

    def __init__(self, config: str) -> None:
        from opencc import OpenCC  # imported on first use: plain English requests never pay

        self._opencc: Any = OpenCC(config)

    def __call__(self, text: str) -> str:
        return str(self._opencc.convert(text)) if text else text


@cache
def converter(config: str) -> _Converter:
    """The shared converter for an OpenCC configuration (built on first use)."""
    return _Converter(config)


def convert_segment(segment: Segment, config: str | None) -> Segment:
    """``segment`` with its text and words converted; times, tokens and statistics kept.

    Args:
        segment: A finished segment.
        config: From :func:`target`; ``None`` returns the segment unchanged.
    """
    if config is None:
        return segment
    convert = converter(config)
    words = segment.words
    if words:
        # Phrases decide characters (头发 -> 頭髮, 发展 -> 發展), and a phrase may span words: the
        # words are converted as one text and cut back where they were. These configurations
        # map character for character, so the cuts fall in the same places.
        joined = "".join(w.word for w in words)
        converted = convert(joined)
        if len(converted) == len(joined):
            texts, at = [], 0
            for w in words:
                texts.append(converted[at : at + len(w.word)])
                at += len(w.word)
        else:
            texts = [convert(w.word) for w in words]
        words = tuple(
            Word(text, w.start, w.end, w.probability) for text, w in zip(texts, words, strict=True)
        )
    return replace(segment, text=convert(segment.text), words=words)


def convert_transcript(transcript: Transcript, config: str | None) -> Transcript:
    """``transcript`` with its Chinese segments in the script ``config`` converts to
    (translations are English, and other languages are left alone). A segment's own language
    decides, where the file's languages were detected per stretch."""
    if config is None or transcript.task != "transcribe":
        return transcript
    chinese = [
        is_chinese(transcript.task, s.language or transcript.language) for s in transcript.segments
    ]
    if not any(chinese):
        return transcript
    segments = tuple(
        convert_segment(s, config) if wanted else s
        for s, wanted in zip(transcript.segments, chinese, strict=True)
    )
    return replace(transcript, segments=segments)


def is_chinese(task: str, language: str | None) -> bool:
    """Whether output in ``language`` for ``task`` is Chinese text to convert."""
    return task == "transcribe" and language == "zh"


__all__ = ["convert_segment", "convert_transcript", "converter", "is_chinese", "target"]
