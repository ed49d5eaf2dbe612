"""Amounts of memory as people write them (``22GiB``, ``1.5GB``, ``90%``), and back.

Settings such as ``WHISPER_GPU_MEMORY_LIMIT`` accept either an absolute size or a share of the
device's total, so the value is kept unresolved until the total is known.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Decimal units are powers of 1000 and binary units powers of 1024, as in the IEC standard;
# the Kubernetes spellings (Ki, Mi, ...) are accepted because operators paste them from pod specs.
_UNITS: dict[str, tuple[str, int]] = {
    "b": ("B", 1),
    "kb": ("KB", 10**3),
    "mb": ("MB", 10**6),
    "gb": ("GB", 10**9),
    "tb": ("TB", 10**12),
    "kib": ("KiB", 2**10),
    "mib": ("MiB", 2**20),
    "gib": ("GiB", 2**30),
    "tib": ("TiB", 2**40),
    "ki": ("KiB", 2**10),
    "mi": ("MiB", 2**20),
    "gi": ("GiB", 2**30),
    "ti": ("TiB", 2**40),
}
# A bare "G" means GB to some tools and GiB to others; refusing it beats guessing wrong by 7%.
_AMBIGUOUS = {"k", "m", "g", "t"}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z%]*)\s*$")
_BINARY_STEPS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


@dataclass(frozen=True)
class MemoryAmount:
    """A size in bytes, or a percentage of whatever total it is later resolved against.

    Attributes:
        value: The number as written (``1.5`` for ``1.5GB``, ``90`` for ``90%``).
        unit: The canonical unit: ``B``, ``KB`` ... ``TB``, ``KiB`` ... ``TiB``, or ``%``.
    """

    value: float
    unit: str = "B"

    def __post_init__(self) -> None:
        if self.unit != "%" and self.unit not in {u for u, _ in _UNITS.values()}:
            raise ValueError(f"unknown memory unit {self.unit!r}")
        if not math.isfinite(self.value) or self.value < 0:
            raise ValueError(f"a memory amount cannot be negative or infinite: {self.value!r}")
        if self.unit == "%" and self.value > 100:
            raise ValueError(f"a percentage of memory must be between 0 and 100, not {self.value}")

    @classmethod
    def parse(cls, text: str) -> MemoryAmount:
        """Parse a size such as ``22GiB``, ``512MiB``, ``1.5GB``, ``1048576`` or ``90%``.

        Args:
            text: The amount. Units are case-insensitive; a bare integer is a number of bytes;
                ``%`` is a share of the total the amount is resolved against.

        Returns:
            The amount, not yet resolved.

        Raises:
            ValueError: The text is not an amount of memory; the message says what is accepted.
        """
        match = _PATTERN.match(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not an amount of memory; write e.g. 22GiB, 512MiB, 1.5GB, "
                "a number of bytes, or a percentage such as 90%"
            )
        number, unit = match.group(1), match.group(2)
        value = float(number)
        if unit == "%":
            if value > 100:
                raise ValueError(f"{text!r}: a percentage of memory must be at most 100%")
            return cls(value, "%")
        if unit == "":
            if "." in number:
                raise ValueError(
                    f"{text!r}: a bare number is a count of bytes and must be whole; "
                    "add a unit such as MiB or GB"
                )
            return cls(value, "B")
        key = unit.lower()
        if key in _AMBIGUOUS:
            raise ValueError(
                f"{text!r}: the unit {unit!r} is ambiguous; write {unit.upper()}B "
                f"(powers of 1000) or {unit.upper()}iB (powers of 1024)"
            )
        if key not in _UNITS:
            raise ValueError(
                f"{text!r}: unknown unit {unit!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %"
            )
        canonical = _UNITS[key][0]
        if canonical == "B" and "." in number:
            raise ValueError(f"{text!r}: a count of bytes must be whole")
        return cls(value, canonical)

    @property
    def is_relative(self) -> bool:
        """Whether this is a percentage of a total rather than a fixed size."""
        return self.unit == "%"

    def resolve(self, total_bytes: int) -> int:
        """The amount in bytes.

        Args:
            total_bytes: The total a percentage refers to (ignored for absolute sizes).

        Returns:
            Bytes, rounded down.
        """
        if self.unit == "%":
            return int(total_bytes * self.value / 100)
        return int(self.value * _multiplier(self.unit))

    def __str__(self) -> str:
        return f"{_format_number(self.value)}{self.unit}"


def format_bytes(n: int | float) -> str:
    """Bytes in binary units for people to read: ``1.34 GiB``, ``229.4 MiB``, ``512 B``.

    Args:
        n: A number of bytes; negative numbers keep their sign.

    Returns:
        Two decimals below 10 units, one from 10 up, trailing zeros dropped.
    """
    sign = "-" if n < 0 else ""
    size = abs(float(n))
    for unit, multiplier in _BINARY_STEPS:
        if size >= multiplier:
            scaled = size / multiplier
            decimals = 2 if scaled < 10 else 1
            return f"{sign}{_format_number(round(scaled, decimals))} {unit}"
    return f"{sign}{int(size)} B"


def _multiplier(unit: str) -> int:
    for canonical, multiplier in _UNITS.values():
        if canonical == unit:
            return multiplier
    raise ValueError(f"unknown memory unit {unit!r}")


def _format_number(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"
