from __future__ import annotations

import pytest
from faster_whisper.tokenizer import _LANGUAGE_CODES

from server.errors import InvalidRequestError
from server.languages import (
    LANGUAGES,
    TO_LANGUAGE_CODE,
    LanguageTag,
    language_name,
    normalize_language,
    parse_language,
)


def test_table_matches_faster_whisper() -> None:
    assert set(LANGUAGES) == set(_LANGUAGE_CODES)


def test_names_are_lowercase_and_unique() -> None:
    names = list(LANGUAGES.values())
    assert all(n == n.lower() for n in names)
    assert len(set(names)) == len(names)


def test_every_alias_points_at_a_known_code() -> None:
    assert set(TO_LANGUAGE_CODE.values()) <= set(LANGUAGES)


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("en", "english"),
        ("zh", "chinese"),
        ("ja", "japanese"),
        ("yue", "cantonese"),
        ("haw", "hawaiian"),
        ("jw", "javanese"),
        ("ht", "haitian creole"),
        ("EN", "english"),
        ("xx", "xx"),  # unknown codes pass through rather than fail a finished render
    ],
)
def test_language_name(code: str, name: str) -> None:
    assert language_name(code) == name


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("en", "en"),
        ("EN", "en"),
        (" zh ", "zh"),
        ("yue", "yue"),
        ("English", "en"),
        ("chinese", "zh"),
        ("CANTONESE", "yue"),
        ("haitian creole", "ht"),
        ("mandarin", "zh"),
        ("castilian", "es"),
        ("valencian", "ca"),
        ("burmese", "my"),
        ("en-US", "en"),
        ("zh_TW", "zh"),
    ],
)
def test_normalize_language(value: str | None, code: str | None) -> None:
    assert normalize_language(value) == code


@pytest.mark.parametrize("value", ["klingon", "xx", "e", "english-ish", "-en"])
def test_unknown_language_is_a_client_error(value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        normalize_language(value)
    err = info.value
    assert err.status == 400
    assert err.param == "language"
    assert err.code == "invalid_language"
    assert repr(value) in err.message
    assert "'en'" in err.message and "yue" in err.message


@pytest.mark.parametrize(
    ("value", "code", "script", "region"),
    [
        ("zh", "zh", None, None),
        ("mandarin", "zh", None, None),
        ("zh-CN", "zh", "simplified", "cn"),
        ("zh-cn", "zh", "simplified", "cn"),
        ("zh_SG", "zh", "simplified", "sg"),
        ("zh-Hans", "zh", "simplified", None),
        ("zh-TW", "zh", "traditional", "tw"),
        ("zh-HK", "zh", "traditional", "hk"),
        ("zh-MO", "zh", "traditional", "mo"),
        ("zh-Hant", "zh", "traditional", None),
        # a script subtag wins over the region
        ("zh-Hant-CN", "zh", "traditional", "cn"),
        ("zh-Hans-TW", "zh", "simplified", "tw"),
        ("en-US", "en", None, None),
        ("pt-BR", "pt", None, None),
        ("sr-Latn-RS", "sr", None, None),
    ],
)
def test_parse_language_tags(value: str, code: str, script: str | None, region: str | None) -> None:
    assert parse_language(value) == LanguageTag(code, script, region)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["zh-", "zh--CN", "zh-C N", "xx-CN", "klingon-TW"])
def test_malformed_or_unknown_tags_are_client_errors(value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_language(value)
    assert info.value.param == "language"
    assert info.value.code == "invalid_language"
