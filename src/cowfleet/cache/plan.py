"""The clean pass's decision: a pure function from a :class:`Snapshot` to a :class:`Plan`.

Rules, in order (see docs/cache.md, "Cleaning"):

1. A base that failed verification is quarantined (never deleted: instances
   may depend on it).
2. A file in use (some disk's backing chain, a libvirt domain, a process) stays,
   and its last use is set to now. So does a file pinned by a provisioning in
   progress, and the kernel/ramdisk base of an image base that stays.
3. An unused base whose last use is older than ``max_unused_age`` is removed.
4. Over the byte budget (``max_cache_bytes``, or less than ``min_free_percent``
   of the filesystem free) the remaining unused bases are evicted least
   recently used first until under; the plan says how far over the budget the
   files that must stay are on their own.
5. A ``.part`` or ``.converted`` left by a download nobody holds the lock of is
   removed after ``part_max_age``; so is a temporary metadata file.
6. Anything else (a file neither cowfleet nor Nova would make) is left alone.

When a disk or a source could not be read, nothing but temporary files is
removed: what it uses is unknown.

No I/O here: the same snapshot and policy always give the same plan, which is
what ``cache clean --dry-run`` prints and what the executor
(:mod:`cowfleet.cache.execute`) carries out, re-checking each step under its lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import base_name, is_image_id
from cowfleet.cache.listing import PIN, BaseEntry
from cowfleet.cache.report import KEEP, QUARANTINE, REMOVE, Decision
from cowfleet.cache.snapshot import PART_KINDS, FileFacts, FsSpace, Snapshot, pinnable
from cowfleet.units import human_bytes

if TYPE_CHECKING:
    from cowfleet.config import Config

# what a step does (the report shows every removal as "remove")
REMOVE_PART = "remove-part"  # a .part/.converted file, under its download lock
REMOVE_TEMP = "remove-temp"  # a killed writer's temporary metadata file
ACTIONS = (KEEP, REMOVE, REMOVE_PART, REMOVE_TEMP, QUARANTINE)
REMOVALS = (REMOVE, REMOVE_PART, REMOVE_TEMP)
TOUCHED_KINDS = ("base", "ephemeral", "swap")


@dataclass(frozen=True)
class CleanPolicy:
    """The limits one pass applies."""

    max_unused_age: float
    part_max_age: float
    max_cache_bytes: int = 0  # 0: no byte budget
    min_free_percent: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config, *, min_age: float | None = None) -> CleanPolicy:
        return cls(
            max_unused_age=cfg.max_unused_age if min_age is None else min_age,
            part_max_age=cfg.part_max_age,
            max_cache_bytes=cfg.max_cache_bytes,
            min_free_percent=cfg.min_free_percent,
        )


@dataclass(frozen=True)
class Step:
    """One file and what to do with it, and why."""

    file: FileFacts
    action: str  # one of ACTIONS
    reason: str
    touch: bool = False  # in use: record its last use as the snapshot's time

    @property
    def entry(self) -> BaseEntry:
        return self.file.entry

    @property
    def removes(self) -> bool:
        return self.action in REMOVALS

    def decision(
        self, *, action: str | None = None, reason: str | None = None, done: bool = False
    ) -> Decision:
        """The report line of this step (as planned, unless told otherwise)."""
        e = self.entry
        act = action if action is not None else self.action
        return Decision(
            name=e.name,
            kind=e.kind,
            image_id=e.image_id,
            image_name=e.image_name,
            state=e.state,
            allocated=e.allocated,
            last_used=e.last_used,
            users=e.users,
            action=REMOVE if act in REMOVALS else act,
            done=done,
            reason=self.reason if reason is None else reason,
            in_use_by=e.in_use_by,
        )


@dataclass(frozen=True)
class Plan:
    """Every step of one pass, in the snapshot's order, and the budget arithmetic."""

    steps: tuple[Step, ...]
    cache_bytes: int  # allocated bytes of the files planned for
    in_use_bytes: int
    budget_bytes: int | None  # the byte target (None: no budget)
    over_budget_bytes: int  # what the files that must stay exceed it by

    @property
    def freed_bytes(self) -> int:
        return sum(s.entry.allocated for s in self.steps if s.removes)

    def decisions(self) -> tuple[Decision, ...]:
        """The plan as a dry run reports it."""
        return tuple(s.decision() for s in self.steps)


def plan(snapshot: Snapshot, policy: CleanPolicy) -> Plan:
    """Decide what happens to every file of the snapshot. Pure: no I/O."""
    now = snapshot.at
    items = [i for i in (_classify(f, now, policy) for f in snapshot.files) if i is not None]
    _protect_dependencies(items)
    budget, over = _apply_budget(items, policy, snapshot.fs)
    if snapshot.unreadable:
        _hold_everything(items, len(snapshot.unreadable))
    return Plan(
        steps=tuple(i.step() for i in items),
        cache_bytes=sum(i.file.entry.allocated for i in items),
        in_use_bytes=sum(i.file.entry.allocated for i in items if i.file.entry.used),
        budget_bytes=budget,
        over_budget_bytes=over,
    )


# -- deciding ---------------------------------------------------------------------


@dataclass
class _Item:
    file: FileFacts
    action: str = KEEP
    reason: str = ""
    candidate: bool = False  # unused, unpinned: may be evicted for the budget
    needs: tuple[str, ...] = ()  # kernel/ramdisk base names this image base needs

    def step(self) -> Step:
        e = self.file.entry
        touch = self.action == KEEP and e.used and e.kind in TOUCHED_KINDS
        return Step(self.file, self.action, self.reason, touch)


def _classify(f: FileFacts, now: float, policy: CleanPolicy) -> _Item | None:
    e = f.entry
    item = _Item(f)
    if e.kind == "temp":
        age = now - (e.last_used or 0.0)
        if age < policy.part_max_age:
            return None  # a writer may still be at work: not worth a line
        item.action = REMOVE_TEMP
        item.reason = f"temporary file left by a killed writer, {_age(age)}"
        return item
    if e.kind in PART_KINDS:
        return _classify_part(item, now, policy)
    if e.kind == "quarantined":
        item.reason = f"quarantined ({e.failure}): inspect it, then delete it by hand"
        return item
    if e.kind == "unknown" or e.state == "stray" or not pinnable(e.name):
        item.reason = e.failure or "not a file cowfleet or Nova makes: left alone"
        return item
    if e.state == md.STATE_FAILED:
        item.action = QUARANTINE
        item.reason = f"failed verification: {e.failure or 'size or digest differs'}"
        if e.used:
            item.reason += f" (in use by {_uses(e)}: they keep their open file)"
        return item
    item.needs = tuple(
        base_name(i)
        for i in (e.kernel_id, e.ramdisk_id)
        if i and is_image_id(i)  # a free-text image property: may be anything
    )
    if e.used:
        item.reason = f"in use by {_uses(e)}"
        return item
    if PIN in e.in_use_by:
        item.reason = "pinned by a provisioning in progress"
        return item
    last = e.last_used
    age = now - last if last is not None else math.inf
    limit = policy.max_unused_age
    if age >= limit:
        item.action = REMOVE
        item.reason = f"unused for {_age(age)} (limit {_age(limit)})"
    else:
        item.candidate = True
        item.reason = f"unused for {_age(age)}; removed after {_age(limit)}"
    return item


def _classify_part(item: _Item, now: float, policy: CleanPolicy) -> _Item:
    if item.file.download_held:
        item.reason = "download in progress"
        return item
    age = now - (item.file.entry.last_used or 0.0)
    limit = policy.part_max_age
    if age >= limit:
        item.action = REMOVE_PART
        item.reason = f"abandoned download, {_age(age)} old (limit {_age(limit)})"
    else:
        item.reason = f"interrupted download, {_age(age)} old: kept {_age(limit)} to resume"
    return item


def _protect_dependencies(items: list[_Item]) -> None:
    """Kernel/ramdisk bases stay while an image base that names them stays."""
    by_name = {i.file.entry.name: i for i in items}
    for item in items:
        if item.action != KEEP:
            continue
        for dep in item.needs:
            target = by_name.get(dep)
            if target is not None and (target.action == REMOVE or target.candidate):
                target.action = KEEP
                target.candidate = False
                target.reason = f"kernel/ramdisk of image {item.file.entry.image_id}, which stays"


def _apply_budget(
    items: list[_Item], policy: CleanPolicy, fs: FsSpace | None
) -> tuple[int | None, int]:
    """Evict unused bases, least recently used first, while over the budget."""
    total = sum(i.file.entry.allocated for i in items)
    freed = sum(i.file.entry.allocated for i in items if i.action in REMOVALS)
    need = 0
    budget: int | None = None
    if policy.max_cache_bytes:
        budget = policy.max_cache_bytes
        need = total - freed - budget
    if policy.min_free_percent > 0 and fs is not None and fs.total:
        want_free = math.ceil(fs.total * policy.min_free_percent / 100)
        short = want_free - (fs.available + freed)
        if short > need:
            need = short
            budget = max(total - freed - short, 0)
    if need <= 0:
        return budget, 0
    for item in sorted(
        (i for i in items if i.candidate), key=lambda i: i.file.entry.last_used or 0.0
    ):
        if need <= 0:
            break
        item.action = REMOVE
        item.candidate = False
        item.reason = (
            f"over the budget by {human_bytes(need)}: least recently used "
            f"({item.reason.partition(';')[0]})"
        )
        need -= item.file.entry.allocated
    return budget, max(need, 0)


def _hold_everything(items: list[_Item], unreadable: int) -> None:
    for item in items:
        if item.action in REMOVALS and item.action != REMOVE_TEMP:
            item.action = KEEP
            item.reason = (
                f"would be removed ({item.reason}), but {unreadable} disks could not be "
                "read, so what they use is unknown"
            )


def _uses(e: BaseEntry) -> str:
    """``N instances`` (disks in instance folders), then the other places it is used."""
    others = [s for s in e.in_use_by if s != PIN and not s.startswith("disk ")]
    parts = [f"{len(e.users)} instances"] if e.users else []
    return ", ".join(parts + others) or "a disk"


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{max(seconds, 0):.0f} s"
