"""No module reads httpx's (or httpcore's) private attributes: the I/O seams the
project uses are public (``httpx.BaseTransport``, request extensions). An object's
own ``self._pool`` is its business; ``client._transport`` is not."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "cowfleet"
NAMES = r"_transport|_pool|_transport_for_url|_mounts"
ATTR = re.compile(rf"(\w+|\))\.({NAMES})\b")
GETATTR = re.compile(rf"getattr\([^,]+,\s*[\"']({NAMES})[\"']")


def private_reads(line: str) -> list[str]:
    found = [m.group(0) for m in ATTR.finditer(line) if m.group(1) != "self"]
    return found + [m.group(0) for m in GETATTR.finditer(line)]


def test_no_source_file_reads_httpx_private_attributes() -> None:
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if private_reads(line):
                hits.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert hits == []


def test_the_check_catches_what_the_old_fast_path_did() -> None:
    assert private_reads("type(http_client._transport).__name__")
    assert private_reads('getattr(http_client, "_transport", None)')
    assert private_reads("client._pool.connections")
    assert not private_reads("self._pool.take()")
