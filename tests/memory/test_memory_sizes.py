"""Memory amounts as written in settings, and bytes as shown to people."""

from __future__ import annotations

import pytest

from server.memory import MemoryAmount, format_bytes

GiB = 2**30
MiB = 2**20


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        ("22GiB", 0, 22 * GiB),
        ("512MiB", 0, 512 * MiB),
        ("1.5GB", 0, 1_500_000_000),
        ("1KB", 0, 1000),
        ("1KiB", 0, 1024),
        ("3MB", 0, 3_000_000),
        ("1TiB", 0, 2**40),
        ("2TB", 0, 2 * 10**12),
        ("1048576", 0, 1048576),
        ("0", 0, 0),
        ("  4 gib ", 0, 4 * GiB),
        ("2Gi", 0, 2 * GiB),
        ("512B", 0, 512),
        (".5GiB", 0, GiB // 2),
        ("90%", 1000, 900),
        ("100%", 24 * GiB, 24 * GiB),
        ("0%", 24 * GiB, 0),
        ("12.5%", 800, 100),
    ],
)
def test_parse_and_resolve(text: str, total: int, expected: int) -> None:
    assert MemoryAmount.parse(text).resolve(total) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not an amount of memory"),
        ("abc", "not an amount of memory"),
        ("-1GiB", "not an amount of memory"),
        ("1e9", "not an amount of memory"),
        ("GiB", "not an amount of memory"),
        ("1.5", "must be whole"),
        ("1.5B", "must be whole"),
        ("10G", "ambiguous"),
        ("10m", "ambiguous"),
        ("150%", "at most 100%"),
        ("12 parsecs", "unknown unit"),
        ("nan", "not an amount of memory"),
        ("1 2GiB", "not an amount of memory"),
    ],
)
def test_parse_rejects_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryAmount.parse(text)


@pytest.mark.parametrize("text", ["22GiB", "1.5GB", "90%", "512MiB", "1048576B", "12.5%"])
def test_str_round_trips(text: str) -> None:
    amount = MemoryAmount.parse(text)
    assert str(amount) == text
    assert MemoryAmount.parse(str(amount)) == amount


def test_str_of_a_bare_integer_names_bytes() -> None:
    assert str(MemoryAmount.parse("1048576")) == "1048576B"


def test_relative_amounts_say_so() -> None:
    assert MemoryAmount.parse("90%").is_relative
    assert not MemoryAmount.parse("90GiB").is_relative


@pytest.mark.parametrize(
    ("value", "unit"), [(-1.0, "B"), (101.0, "%"), (1.0, "GB!"), (float("inf"), "GiB")]
)
def test_constructor_validates(value: float, unit: str) -> None:
    with pytest.raises(ValueError):
        MemoryAmount(value, unit)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (int(1.34 * GiB), "1.34 GiB"),
        (int(229.44 * MiB), "229.4 MiB"),
        (512 * MiB, "512 MiB"),
        (int(23.57 * GiB), "23.6 GiB"),
        (1536, "1.5 KiB"),
        (512, "512 B"),
        (0, "0 B"),
        (-int(1.5 * GiB), "-1.5 GiB"),
        (3 * 2**40, "3 TiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected
