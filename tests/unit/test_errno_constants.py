"""errno values are compared by name (``errno.ENOSPC``), never by number."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# ``exc.errno == 28``, ``e.errno in (28, 122)``, ``get_errno() != 95``, ``OSError(28, ...)``
MAGIC = re.compile(
    r"(errno(\(\))?\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[{]?\s*-?\d)|((OSError|IOError)\(\s*\d)"
)


def test_no_magic_errno_numbers() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for top in ("src", "tests", "bench")
        for path in sorted((ROOT / top).rglob("*.py"))
        if path != Path(__file__).resolve()  # its examples are the pattern's own test
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if MAGIC.search(line)
    ]
    assert hits == []


def test_the_pattern_finds_what_it_is_for() -> None:
    for bad in (
        "if exc.errno == 22:",
        "cls = X if exc.errno in (28, 122) else Y",
        "if ctypes.get_errno() != 95:",
        'raise OSError(28, "No space left on device")',
    ):
        assert MAGIC.search(bad), bad
    for good in ("if exc.errno == errno.EINVAL:", "exc.errno in (errno.ENOSPC, errno.EDQUOT)"):
        assert not MAGIC.search(good), good
