"""The user and group libvirt runs QEMU as, read from ``qemu.conf`` text (no I/O here).

Only the top-level ``user = "..."`` and ``group = "..."`` lines matter; comments and
other keys are skipped. A value may be a name or ``+UID``/``+GID``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r'^\s*(user|group)\s*=\s*"([^"]*)"\s*(?:#.*)?$')
# Debian's libvirt runs QEMU as this user and group when qemu.conf sets none.
DEBIAN_DEFAULT = "libvirt-qemu"


@dataclass(frozen=True)
class QemuIdentity:
    user: str | None
    group: str | None


def parse(text: str) -> QemuIdentity:
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(2):
            found[m.group(1)] = m.group(2)
    return QemuIdentity(found.get("user"), found.get("group"))
