"""Byte counts as people read them (one formatter for every table and report)."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``; exact bytes below 1 KiB."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"
