"""Argument types the benchmark scripts share: counts that must be at least 1 (argparse reports a bad one
by the type's name, e.g. "invalid positive_int value: '0'")."""

from __future__ import annotations


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated, each >= 1."""
    return [positive_int(n) for n in text.split(",")]
