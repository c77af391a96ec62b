"""Parsing of one ``Range: bytes=...`` header (sans-I/O).

Forms: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n``. Several ranges -> 400 (like Glance);
a range starting at or past the end -> 416; anything malformed -> 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cowfleet.errors import ValidationError

_SPEC = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.ASCII)
MAX_HEADER = 200


@dataclass(frozen=True)
class ByteRange:
    """Inclusive ``first``..``last`` byte positions of a file of ``size`` bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range to send, or None for the whole file."""
    if header is None:
        return None
    if len(header) > MAX_HEADER:
        raise ValidationError("Range header too long", http_status=400)
    if "," in header:
        raise ValidationError("multiple ranges are not supported", http_status=400)
    m = _SPEC.match(header)
    if m is None or (not m.group(1) and not m.group(2)):
        raise ValidationError(f"malformed Range header: {header!r}", http_status=400)
    start, end = m.group(1), m.group(2)
    if not start:  # suffix: the last n bytes
        n = int(end)
        if n == 0 or size == 0:
            raise unsatisfiable(header, size)
        return ByteRange(max(0, size - n), size - 1, size)
    first = int(start)
    last = int(end) if end else size - 1
    if end and last < first:
        raise ValidationError(f"malformed Range header: {header!r}", http_status=400)
    if first >= size:
        raise unsatisfiable(header, size)
    return ByteRange(first, min(last, size - 1), size)


def unsatisfiable(header: str, size: int) -> ValidationError:
    return ValidationError(
        f"Range {header!r} is not satisfiable for {size} bytes",
        http_status=416,
        headers={"Content-Range": f"bytes */{size}"},
    )
