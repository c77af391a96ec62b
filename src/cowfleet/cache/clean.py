"""One pass of the cache manager over ``_base``: what stays, what goes, and why.

Rules, in order (see docs/cache.md, "Cleaning"):

1. A base that failed verification is moved to ``_base/.cowfleet/quarantine/``
   (never deleted: instances may depend on it) and reported loudly.
2. A file in some disk's backing chain is **in use** and stays; its last use is
   set to now. So is a file pinned by a provisioning in progress, and the
   kernel/ramdisk base of an image base that stays.
3. An unused base whose last use is older than ``max_unused_age`` is removed.
4. Over the byte budget (``max_cache_bytes``, or less than ``min_free_percent``
   of the filesystem free) the remaining unused bases are evicted least
   recently used first until under; the report says how far over the budget the
   files that must stay are on their own.
5. A ``.part`` or ``.converted`` left by a download nobody holds the lock of is
   removed after ``part_max_age``.
6. Anything else (a file neither cowfleet nor Nova would make) is left alone.

"In use" comes from every instance disk's backing chain (symlinks followed),
every disk of every libvirt domain defined on the node, and every file a
running process holds open or mapped (:mod:`cowfleet.cache.holders`, injected as
``sources``); each decision says where its uses were found (``in_use_by``).
When a disk or a source could not be read, nothing is removed: what it uses is
unknown.
A dry run takes no lock, creates no file and changes no time stamp, so it is
safe on a live Nova compute node's directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cowfleet.cache import metadata as md
from cowfleet.cache import pins
from cowfleet.cache.holders import HolderSource, collect, node_sources
from cowfleet.cache.layout import META_DIRNAME, SHA1_RE, Layout, is_image_id
from cowfleet.cache.listing import PIN, BaseEntry, list_entries
from cowfleet.cache.lock import base_lock, is_held, lock_path
from cowfleet.cache.usage import Problem, scan
from cowfleet.config import Config
from cowfleet.errors import CowfleetError, LocalIOError, TimeoutError_, UsageError
from cowfleet.units import human_bytes

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"

# actions
KEEP = "keep"
REMOVE = "remove"
QUARANTINE = "quarantine"

StopCheck = Callable[[], bool]


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
class Decision:
    """One file of ``_base`` and what the pass did with it."""

    name: str
    kind: str  # base | part | converted | ephemeral | swap | unknown | temp
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


def _pinnable(locks_dir: Path, name: str) -> bool:
    """Whether ``name`` can have a pin file; other names are no file cowfleet or Nova makes."""
    try:
        pins.pin_path(locks_dir, name)
    except UsageError:
        return False
    return True


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


@dataclass
class _Item:
    entry: BaseEntry
    action: str = KEEP
    reason: str = ""
    candidate: bool = False  # unused, unpinned: may be evicted for the budget
    needs: tuple[str, ...] = ()  # kernel/ramdisk base names this image base needs


class Cleaner:
    """One pass over one instances path. Every collaborator is injected."""

    def __init__(
        self,
        layout: Layout,
        policy: CleanPolicy,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
        sources: Sequence[HolderSource] = (),
    ) -> None:
        self.layout = layout
        self.sources = tuple(sources)
        self.policy = policy
        self.clock = clock
        self.monotonic = monotonic
        self.statvfs = statvfs

    # -- the pass ------------------------------------------------------------
    def run(self, *, dry_run: bool = False, stop: StopCheck | None = None) -> CleanReport:
        started = self.monotonic()
        now = self.clock()
        locks = self.layout.locks_dir
        try:
            names = [n for n in os.listdir(self.layout.base_dir) if n != META_DIRNAME]
        except FileNotFoundError:
            names = []
        except OSError as exc:
            raise LocalIOError(
                f"cannot list {self.layout.base_dir}: {exc.strerror}",
                path=str(self.layout.base_dir),
            ) from exc
        # Tokens before the scan: a pin released during the scan changes its token.
        tokens = {n: pins.token(locks, n) for n in names if _pinnable(locks, n)}
        usage = scan(self.layout.instances_path, collect(self.sources, self.layout.base_dir))
        items = [self._classify(e, now) for e in list_entries(self.layout, usage)]
        items += self._temp_files(now)
        self._protect_dependencies(items)
        budget, over = self._apply_budget(items)
        if usage.unreadable:
            self._hold_everything(items, len(usage.unreadable))
        decisions = [self._carry_out(i, tokens, now, dry_run, stop) for i in items]
        removed = sum(d.allocated for d in decisions if d.action == REMOVE)
        report = CleanReport(
            instances_path=str(self.layout.instances_path),
            dry_run=dry_run,
            at=now,
            seconds=self.monotonic() - started,
            instances=usage.instances,
            disks=usage.disks,
            cache_bytes=sum(i.entry.allocated for i in items),
            freed_bytes=removed,
            in_use_bytes=sum(i.entry.allocated for i in items if i.entry.used),
            budget_bytes=budget,
            over_budget_bytes=over,
            decisions=tuple(decisions),
            unreadable=usage.unreadable,
            broken=usage.broken,
            missing_bases=tuple(sorted(usage.missing_bases)),
        )
        self._log(report)
        return report

    # -- deciding --------------------------------------------------------------
    def _classify(self, e: BaseEntry, now: float) -> _Item:
        item = _Item(e)
        locks = self.layout.locks_dir
        if e.kind in ("part", "converted"):
            return self._classify_part(item, now)
        if e.kind == "quarantined":
            item.reason = f"quarantined ({e.failure}): inspect it, then delete it by hand"
            return item
        if e.kind == "unknown" or e.state == "stray" or not _pinnable(locks, e.name):
            item.reason = e.failure or "not a file cowfleet or Nova makes: left alone"
            return item
        if e.state == md.STATE_FAILED:
            item.action = QUARANTINE
            item.reason = f"failed verification: {e.failure or 'size or digest differs'}"
            if e.used:
                item.reason += f" (in use by {_uses(e)}: they keep their open file)"
            return item
        item.needs = tuple(
            self.layout.paths(i).name
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
        limit = self.policy.max_unused_age
        if age >= limit:
            item.action = REMOVE
            item.reason = f"unused for {_age(age)} (limit {_age(limit)})"
        else:
            item.candidate = True
            item.reason = f"unused for {_age(age)}; removed after {_age(limit)}"
        return item

    def _classify_part(self, item: _Item, now: float) -> _Item:
        e = item.entry
        stem = e.name.partition(".")[0]
        if is_held(lock_path(self.layout.locks_dir, stem)):
            item.reason = "download in progress"
            return item
        age = now - (e.last_used or 0.0)
        limit = self.policy.part_max_age
        if age >= limit:
            item.action = REMOVE
            item.reason = f"abandoned download, {_age(age)} old (limit {_age(limit)})"
        else:
            item.reason = f"interrupted download, {_age(age)} old: kept {_age(limit)} to resume"
        return item

    def _temp_files(self, now: float) -> list[_Item]:
        """Temporary metadata files (``.cowfleet/.*.tmp``) left by a killed writer."""
        out: list[_Item] = []
        try:
            entries = list(os.scandir(self.layout.meta_dir))
        except OSError:
            return out
        for ent in entries:
            if not (ent.name.startswith(".") and ent.name.endswith(TEMP_SUFFIX)):
                continue
            try:
                st = ent.stat(follow_symlinks=False)
            except OSError:
                continue
            age = now - st.st_mtime
            if age < self.policy.part_max_age:
                continue
            entry = BaseEntry(
                name=f"{META_DIRNAME}/{ent.name}",
                path=Path(ent.path),
                kind="temp",
                image_id=None,
                image_name=None,
                format=None,
                disk_format=None,
                allocated=st.st_blocks * 512,
                size=st.st_size,
                virtual_size=None,
                users=(),
                last_used=st.st_mtime,
                state="stray",
            )
            out.append(_Item(entry, REMOVE, f"temporary file left by a killed writer, {_age(age)}"))
        return out

    @staticmethod
    def _protect_dependencies(items: list[_Item]) -> None:
        """Kernel/ramdisk bases stay while an image base that names them stays."""
        by_name = {i.entry.name: i for i in items}
        for item in items:
            if item.action != KEEP:
                continue
            for dep in item.needs:
                target = by_name.get(dep)
                if target is not None and (target.action == REMOVE or target.candidate):
                    target.action = KEEP
                    target.candidate = False
                    target.reason = f"kernel/ramdisk of image {item.entry.image_id}, which stays"

    def _apply_budget(self, items: list[_Item]) -> tuple[int | None, int]:
        """Evict unused bases, least recently used first, while over the budget."""
        total = sum(i.entry.allocated for i in items)
        freed = sum(i.entry.allocated for i in items if i.action == REMOVE)
        need = 0
        budget: int | None = None
        if self.policy.max_cache_bytes:
            budget = self.policy.max_cache_bytes
            need = total - freed - budget
        if self.policy.min_free_percent > 0:
            try:
                fs = self.statvfs(self.layout.base_dir)
            except OSError:
                fs = None
            if fs is not None and fs.f_blocks:
                fs_bytes = fs.f_blocks * fs.f_frsize
                want_free = math.ceil(fs_bytes * self.policy.min_free_percent / 100)
                short = want_free - (fs.f_bavail * fs.f_frsize + freed)
                if short > need:
                    need = short
                    budget = max(total - freed - short, 0)
        if need <= 0:
            return budget, 0
        for item in sorted(
            (i for i in items if i.candidate), key=lambda i: i.entry.last_used or 0.0
        ):
            if need <= 0:
                break
            item.action = REMOVE
            item.candidate = False
            item.reason = (
                f"over the budget by {human_bytes(need)}: least recently used "
                f"({item.reason.partition(';')[0]})"
            )
            need -= item.entry.allocated
        return budget, max(need, 0)

    @staticmethod
    def _hold_everything(items: list[_Item], unreadable: int) -> None:
        for item in items:
            if item.action == REMOVE and item.entry.kind != "temp":
                item.action = KEEP
                item.reason = (
                    f"would be removed ({item.reason}), but {unreadable} disks could not be "
                    "read, so what they use is unknown"
                )

    # -- doing ---------------------------------------------------------------
    def _carry_out(
        self,
        item: _Item,
        tokens: dict[str, bytes],
        now: float,
        dry_run: bool,
        stop: StopCheck | None,
    ) -> Decision:
        e = item.entry
        action, reason, done = item.action, item.reason, False
        stopping = stop is not None and stop()
        if not dry_run and stopping and action != KEEP:
            action, reason = KEEP, f"{reason}; stopping: left for the next pass"
        elif not dry_run and not stopping:
            try:
                if action == KEEP and e.used:
                    self._touch(e, now)
                elif action == REMOVE:
                    why_not = self._remove(e, tokens.get(e.name, b""))
                    if why_not is None:
                        done = True
                    else:
                        action, reason = KEEP, why_not
                elif action == QUARANTINE:
                    why_not = self._quarantine(e, now)
                    if why_not is None:
                        done = True
                    else:
                        action, reason = KEEP, f"{reason}; not quarantined: {why_not}"
            except (OSError, CowfleetError) as exc:
                log.warning("cannot %s %s: %s", action, e.path, exc)
                action, reason = KEEP, f"{reason}; failed: {exc}"
        return Decision(
            name=e.name,
            kind=e.kind,
            image_id=e.image_id,
            image_name=e.image_name,
            state=e.state,
            allocated=e.allocated,
            last_used=e.last_used,
            users=e.users,
            action=action,
            done=done,
            reason=reason,
            in_use_by=e.in_use_by,
        )

    def _touch(self, e: BaseEntry, now: float) -> None:
        """Record that an in-use file was seen in use now (its age counts from here)."""
        if e.kind == "base" and e.image_id is not None:
            md.touch(self.layout.paths_for_name(e.name).meta, now)
        elif e.kind in ("base", "ephemeral", "swap"):
            os.utime(e.path, (now, now), follow_symlinks=False)

    def _remove(self, e: BaseEntry, token: bytes) -> str | None:
        """Remove one file; the reason it was kept instead, or None when removed."""
        locks = self.layout.locks_dir
        if e.kind == "temp":
            md.remove_quietly(e.path)
            return None
        if e.kind in ("part", "converted"):
            stem = e.name.partition(".")[0]
            with self._try_lock(stem) as locked:
                if not locked:
                    return "download in progress"
                md.remove_quietly(e.path)
                if e.kind == "part":
                    md.remove_quietly(self.layout.paths_for_name(stem).part_meta)
            return None
        with pins.exclusive(locks, e.name) as free:
            if not free:
                return "pinned by a provisioning that started during this pass"
            if pins.token(locks, e.name) != token:
                return "a provisioning finished during this pass: looked at again next pass"
            with self._try_lock(e.name) as locked:
                if not locked:
                    return "busy: a fetch or a verification holds it"
                md.remove_quietly(e.path)
                if e.kind == "base" and SHA1_RE.match(e.name):
                    paths = self.layout.paths_for_name(e.name)
                    md.remove_quietly(paths.meta)
                    md.remove_quietly(paths.failed)
        log.info("removed %s (%d bytes): unused", e.path, e.allocated)
        return None

    def _quarantine(self, e: BaseEntry, now: float) -> str | None:
        paths = self.layout.paths_for_name(e.name)
        qdir = self.layout.quarantine_dir
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        with self._try_lock(e.name) as locked:
            if not locked:
                return "busy: a fetch or a verification holds it"
            qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            dest = qdir / f"{e.name}.{stamp}"
            meta = md.read_meta(paths.meta)
            record = {
                "name": e.name,
                "image_id": e.image_id,
                "image_name": e.image_name,
                "reason": e.failure or "failed verification",
                "quarantined_at": now,
                "users": list(e.users),
                "moved_from": str(e.path),
                "metadata": asdict(meta) if meta else None,
            }
            md.write_atomic(dest.with_name(dest.name + ".json"), json.dumps(record, indent=1))
            os.rename(e.path, dest)
            md.remove_quietly(paths.meta)
            md.remove_quietly(paths.failed)
        log.error(
            "QUARANTINED base %s (image %s, used by %d instances): %s; moved to %s; "
            "'cowfleet cache fetch %s' brings back a verified copy under the same name",
            e.path,
            e.image_id,
            len(e.users),
            e.failure,
            dest,
            e.image_id,
        )
        return None

    @contextlib.contextmanager
    def _try_lock(self, name: str) -> Iterator[bool]:
        """The base lock of ``name`` if free now (no waiting): yields whether it was."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(base_lock(self.layout.locks_dir, name, timeout=0))
            except TimeoutError_:
                yield False
                return
            yield True

    def _log(self, report: CleanReport) -> None:
        level = logging.ERROR if report.count(QUARANTINE) else logging.INFO
        log.log(level, "cache pass on %s: %s", report.instances_path, report.summary())
        for p in report.unreadable:
            log.warning("cannot tell what %s uses: %s", p.path, p.reason)
        for p in report.broken:
            log.warning("broken backing chain: %s: %s", p.path, p.reason)


def clean(
    cfg: Config,
    *,
    dry_run: bool = False,
    min_age: float | None = None,
    clock: Callable[[], float] = time.time,
    stop: StopCheck | None = None,
) -> CleanReport:
    """One clean pass over ``cfg.instances_path`` with the configured limits."""
    cleaner = Cleaner(
        Layout(cfg.instances_path),
        CleanPolicy.from_config(cfg, min_age=min_age),
        clock=clock,
        sources=node_sources(cfg),
    )
    return cleaner.run(dry_run=dry_run, stop=stop)
