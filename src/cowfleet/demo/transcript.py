"""The narrated transcript: sans-I/O formatting plus a small writer.

Every function that turns data into text is pure (unit-tested); the
:class:`Transcript` only writes lines to a stream, so the same text goes to a
terminal, a pipe or a test.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from cowfleet.units import human_bytes

WIDTH = 96
CONSOLE_PREFIX = "cowfleet-guest:"


def _wrap(text: str, width: int) -> str:
    """``text`` refilled to ``width``; a path or URL is never split (a user copies it)."""
    return textwrap.fill(
        " ".join(text.split()), width, break_on_hyphens=False, break_long_words=False
    )


def shell_line(argv: Sequence[str]) -> str:
    """The command as a user would type it (``$ cowfleet ...``)."""
    return "$ " + " ".join(shlex.quote(a) for a in argv)


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + ln if ln else ln for ln in text.rstrip("\n").splitlines())


def console_lines(log: str) -> list[str]:
    """The guest's own lines (``cowfleet-guest: ...``) from a serial console log."""
    out = []
    for raw in log.splitlines():
        line = raw.strip().replace("\r", "")
        pos = line.find(CONSOLE_PREFIX)
        if pos >= 0:
            out.append(line[pos:])
    return out


def boot_proof(log: str) -> str | None:
    """The console line proving the guest booted and wrote to its disk, if any."""
    lines = console_lines(log)
    for want in ("marker written", "booted"):
        for line in lines:
            if want in line:
                return line
    return None


def guest_finished(log: str) -> bool:
    """True once the guest has said all it will before holding: its marker, or power-off."""
    return any(
        "marker written" in ln or "powering off" in ln or "no /dev/vda" in ln
        for ln in console_lines(log)
    )


def console_tail(log: str, lines: int = 5) -> str:
    """The last non-empty lines of a console log (for an error message)."""
    kept = [ln.strip() for ln in log.replace("\r", "").splitlines() if ln.strip()]
    return " | ".join(kept[-lines:]) if kept else "(console empty)"


def virsh_table(text: str) -> list[list[str]]:
    """Rows of a virsh-style table (header and rule skipped), columns split on 2+ spaces."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    rule = next((i for i, ln in enumerate(lines) if set(ln.strip()) == {"-"}), None)
    body = lines[rule + 1 :] if rule is not None else lines
    return [re.split(r"\s{2,}", ln.strip()) for ln in body]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain left-aligned table (like ``print_table``), as text."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    out = [(" " + "   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))).rstrip()]
    out.append("-" * (sum(widths) + 3 * (len(widths) - 1) + 2))
    for r in cells:
        out.append((" " + "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip())
    return "\n".join(out)


@dataclass(frozen=True)
class FetchSummary:
    """What one node fetched while booting its instances (from the cache's records)."""

    node: str
    instances: int
    fetches: int  # base files written by a download during the phase
    images: int  # distinct images those instances use
    bytes_fetched: int  # sum of the fetched images' sizes (cache metadata image_size)
    service_bytes: int | None  # bytes the image service process wrote meanwhile (/proc io)

    @property
    def naive_bytes(self) -> int:
        """What a fetch per instance would have cost."""
        return self.bytes_fetched * self.instances


def fetch_table(rows: Sequence[FetchSummary]) -> str:
    return table(
        ["Node", "Instances", "Images", "Fetches", "Fetched", "Service sent", "Per-instance fetch"],
        [
            [
                r.node,
                r.instances,
                r.images,
                r.fetches,
                human_bytes(r.bytes_fetched),
                "-" if r.service_bytes is None else human_bytes(r.service_bytes),
                human_bytes(r.naive_bytes),
            ]
            for r in rows
        ],
    )


class Transcript:
    """Writes the narration: numbered steps, prose, commands with their output."""

    def __init__(self, out: TextIO, *, bold: bool = False) -> None:
        self._out = out
        self._bold = bold
        self._step = 0

    def _write(self, text: str = "") -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def step(self, title: str) -> None:
        self._step += 1
        head = f"== {self._step}. {title}"
        self._write()
        self._write(f"\033[1m{head}\033[0m" if self._bold else head)

    def say(self, text: str) -> None:
        for para in text.split("\n\n"):
            self._write(_wrap(para, WIDTH))

    def warn(self, text: str) -> None:
        """A loud notice (driver downgrade, generated image): boxed so nobody misses it."""
        lines = _wrap(text, WIDTH - 4).splitlines()
        rule = "!" * WIDTH
        self._write(rule)
        for ln in lines:
            self._write(f"! {ln}")
        self._write(rule)

    def command(self, argv: Sequence[str], output: str) -> None:
        self._write(shell_line(argv))
        if output.strip():
            self._write(indent(output))

    def block(self, text: str) -> None:
        self._write(indent(text))
