"""What a clean pass did (or, in a dry run, would do) with each file of ``_base``.

The records :mod:`cowfleet.cache.clean` returns and ``cache clean`` prints as a
table or as JSON: one :class:`Decision` per file, and the :class:`CleanReport`
of the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from cowfleet.cache.usage import Problem
from cowfleet.units import human_bytes

# the actions a report shows (the plan's remove-part and remove-temp show as remove)
KEEP = "keep"
REMOVE = "remove"
QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Decision:
    """One file of ``_base`` and what the pass did with it."""

    name: str
    kind: str  # base | part | converted | ephemeral | swap | unknown | temp | quarantined
    image_id: str | None
    image_name: str | None
    state: str
    allocated: int
    last_used: float | None
    users: tuple[str, ...]
    action: str  # keep | remove | quarantine
    done: bool  # the action was carried out (False: dry run, or kept)
    reason: str
    in_use_by: tuple[str, ...] = ()  # "disk <path>", "libvirt domain <name>", "process ...", "pin"


@dataclass(frozen=True)
class CleanReport:
    instances_path: str
    dry_run: bool
    at: float
    seconds: float
    instances: int
    disks: int
    cache_bytes: int  # allocated bytes of _base before the pass
    freed_bytes: int  # by removals (to be) carried out
    in_use_bytes: int
    budget_bytes: int | None  # the byte target this pass worked to (None: no budget)
    over_budget_bytes: int  # what still exceeds it after the pass (the kept set alone)
    decisions: tuple[Decision, ...]
    unreadable: tuple[Problem, ...]
    broken: tuple[Problem, ...]
    missing_bases: tuple[str, ...] = ()  # _base names some disk needs but that are gone

    def count(self, action: str) -> int:
        return sum(1 for d in self.decisions if d.action == action)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        parts = [
            f"{self.count(KEEP)} kept",
            f"{self.count(REMOVE)} {verb} ({human_bytes(self.freed_bytes)})",
        ]
        if self.count(QUARANTINE):
            parts.append(f"{self.count(QUARANTINE)} quarantined")
        text = (
            f"{', '.join(parts)}; {self.disks} disks in {self.instances} folders read "
            f"in {self.seconds:.2f}s"
        )
        if self.over_budget_bytes:
            over = human_bytes(self.over_budget_bytes)
            text += f"; files that must stay exceed the budget by {over}"
        if self.unreadable:
            text += f"; {len(self.unreadable)} disks unreadable, nothing removed"
        return text
