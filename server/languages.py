"""The languages Whisper knows: ISO codes, the English names OpenAI reports, and the one
function that turns whatever a client sends in the ``language`` field into a code."""

from __future__ import annotations

from typing import Final

from server.errors import InvalidRequestError

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


def normalize_language(value: str | None) -> str | None:
    """Turn the request's ``language`` field into a Whisper language code.

    Accepts a code in any case (``"en"``, ``"EN"``), an English name (``"English"``), one of
    openai-whisper's aliases (``"mandarin"``, ``"castilian"``), or a regional tag whose
    primary subtag is a known code (``"en-US"``, ``"zh_TW"``).

    Args:
        value: The field as sent; ``None`` or blank means "detect the language".

    Returns:
        The code, e.g. ``"zh"``, or ``None`` to detect the language.

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
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    primary = key.split("-", 1)[0]
    if "-" in key and primary in LANGUAGES:
        return primary
    raise InvalidRequestError(
        f"Unsupported language {value!r}. Send an ISO-639-1 code such as 'en' or 'zh', or an "
        "English language name such as 'english', or leave 'language' out to detect it. "
        f"Supported codes: {', '.join(sorted(LANGUAGES))}.",
        param="language",
        code="invalid_language",
    )
