"""Sizes as people type them (``10G``, ``2M``, ``512``) and as they read them."""

from __future__ import annotations

import argparse
import re

__all__ = ["format_size", "parse_size", "size_argument"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``N[K|M|G|T][iB|B]`` (binary units) into bytes.

    Raises :class:`ValueError` with a message fit for a user on anything else.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512, 64K, 2M, 10G, 1T)")
    number, unit, _ = match.groups()
    return int(number) * _UNITS[unit.upper()]


def format_size(size: int) -> str:
    """Render *size* bytes with the largest binary unit that keeps it readable."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def size_argument(text: str) -> int:
    """``parse_size`` for argparse: a bad size is a command-line error (exit 2)."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
