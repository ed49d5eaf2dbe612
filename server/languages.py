"""The languages Whisper knows: ISO codes, the English names OpenAI reports, and the one
function that turns whatever a client sends in the ``language`` field into a code (and, for
Chinese, the script the client asked for)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from server.errors import InvalidRequestError, quote

# openai-whisper's ``tokenizer.LANGUAGES``, in its order (the order of the language tokens).
# The names are what OpenAI's verbose_json reports in ``language``.
LANGUAGES: Final[dict[str, str]] = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}

# openai-whisper's ``tokenizer.TO_LANGUAGE_CODE``: every name above, plus the aliases it accepts.
TO_LANGUAGE_CODE: Final[dict[str, str]] = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}


def language_name(code: str) -> str:
    """The lowercase English name OpenAI reports for a language code.

    Args:
        code: An ISO code from :data:`LANGUAGES`, e.g. ``"en"`` or ``"yue"``.

    Returns:
        The name, e.g. ``"english"``. A code the table does not know is returned unchanged,
        so rendering a finished transcription never fails on the lookup.
    """
    return LANGUAGES.get(code.lower(), code)


#: How Chinese text is written. ``model`` leaves Whisper's output as it is.
ChineseScript = Literal["simplified", "traditional", "model"]

# BCP-47 script and region subtags that say which script a Chinese reader expects. A script
# subtag wins over a region (zh-Hant-CN is traditional); a region alone implies its script.
_SCRIPT_SUBTAGS: Final[dict[str, ChineseScript]] = {"hans": "simplified", "hant": "traditional"}
_REGION_SCRIPTS: Final[dict[str, ChineseScript]] = {
    "cn": "simplified",
    "sg": "simplified",
    "my": "simplified",
    "tw": "traditional",
    "hk": "traditional",
    "mo": "traditional",
}


@dataclass(frozen=True)
class LanguageTag:
    """The ``language`` field, understood.

    Attributes:
        code: Whisper's language code, e.g. ``"zh"``.
        script: For Chinese, the script the tag names (``zh-CN`` simplified, ``zh-TW``
            traditional); ``None`` when the tag names none (bare ``zh``), so the server's
            default applies.
        region: For Chinese, the region subtag (``"tw"``, ``"hk"``, ...), which picks the
            regional form of traditional characters.
    """

    code: str
    script: ChineseScript | None = None
    region: str | None = None


def parse_language(value: str | None) -> LanguageTag | None:
    """Turn the request's ``language`` field into a Whisper language code and, for Chinese,
    the script the client asked for.

    Accepts a code in any case (``"en"``, ``"EN"``), an English name (``"English"``), one of
    openai-whisper's aliases (``"mandarin"``, ``"castilian"``), or a BCP-47 tag whose primary
    subtag is a known code (``"en-US"``, ``"pt_BR"``, ``"zh-Hant-TW"``). For Chinese, a script
    subtag (``Hans``, ``Hant``) or a region (``CN``, ``SG``, ``MY`` simplified; ``TW``,
    ``HK``, ``MO`` traditional) sets :attr:`LanguageTag.script`.

    Args:
        value: The field as sent; ``None`` or blank means "detect the language".

    Returns:
        The tag, or ``None`` to detect the language.

    Raises:
        InvalidRequestError: The value names no language Whisper knows
            (``param="language"``, ``code="invalid_language"``).
    """
    if value is None:
        return None
    key = value.strip().lower().replace("_", "-")
    if not key:
        return None
    if key in LANGUAGES:
        return LanguageTag(key)
    if key in TO_LANGUAGE_CODE:
        return LanguageTag(TO_LANGUAGE_CODE[key])
    primary, _, rest = key.partition("-")
    subtags = rest.split("-")
    if rest and primary in LANGUAGES and all(p.isalnum() for p in subtags):
        if primary != "zh":
            return LanguageTag(primary)
        region = next((p for p in subtags if p in _REGION_SCRIPTS), None)
        return LanguageTag(primary, _script(subtags), region)
    raise InvalidRequestError(
        f"Unsupported language {quote(value)}. Send an ISO-639-1 code such as 'en' or 'zh', a "
        "BCP-47 tag such as 'zh-CN' or 'pt-BR', or an English language name such as "
        "'english', or leave 'language' out to detect it. "
        f"Supported codes: {', '.join(sorted(LANGUAGES))}.",
        param="language",
        code="invalid_language",
    )


def language_codes(values: Iterable[str]) -> tuple[str, ...]:
    """Whisper's codes of a list of languages (``languages[]``, WHISPER_LANGUAGES), each in any
    form :func:`parse_language` takes, without repeats and blanks, in the order given.

    Raises:
        InvalidRequestError: a value names no language Whisper knows (``param="language"``).
    """
    codes: list[str] = []
    for value in values:
        tag = parse_language(value)
        if tag is not None and tag.code not in codes:
            codes.append(tag.code)
    return tuple(codes)


def normalize_language(value: str | None) -> str | None:
    """The Whisper language code of the ``language`` field (see :func:`parse_language`)."""
    tag = parse_language(value)
    return None if tag is None else tag.code


def _script(subtags: list[str]) -> ChineseScript | None:
    for subtag in subtags:
        if subtag in _SCRIPT_SUBTAGS:
            return _SCRIPT_SUBTAGS[subtag]
    for subtag in subtags:
        if subtag in _REGION_SCRIPTS:
            return _REGION_SCRIPTS[subtag]
    return None
