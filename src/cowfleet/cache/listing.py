"""``cache list``: every file in ``_base`` with what it is and who uses it.

Users of a base are the instance folders with a disk that has it anywhere in
its backing chain (:mod:`cowfleet.cache.usage`: qcow2 headers read in Python,
so this also works on a Nova node's instances path; no qemu-img, no subprocess).
``in_use_by`` says where each use was found: ``disk <path>`` (an instance disk),
``libvirt domain <name>``, ``process <pid> <comm>`` (:mod:`cowfleet.cache.holders`)
and ``pin`` (a provisioning in progress, :mod:`cowfleet.cache.pins`).

A quarantined base whose image is gone from the image service (the cache
manager tried to fetch it again) is listed as ``quarantined, image gone``.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from cowfleet.cache import metadata as md
from cowfleet.cache import pins
from cowfleet.cache.layout import (
    CONVERTED_SUFFIX,
    META_DIRNAME,
    PART_SUFFIX,
    QUARANTINE_DIRNAME,
    SHA1_RE,
    Layout,
)
from cowfleet.cache.usage import Holders, Usage, scan
from cowfleet.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseEntry:
    name: str  # file name in _base
    path: Path
    kind: str  # base | part | converted | ephemeral | swap | unknown | quarantined
    image_id: str | None
    image_name: str | None
    format: str | None  # format of the file
    disk_format: str | None  # declared Glance disk_format
    allocated: int  # bytes on disk (st_blocks * 512)
    size: int  # apparent size
    virtual_size: int | None
    users: tuple[str, ...]  # instance folders with this file in a disk's backing chain
    last_used: float | None
    state: str  # verified | failed | unverified | resumable | stray | foreign | quarantined
    failure: str | None = None
    kernel_id: str | None = None  # image bases: the kernel/ramdisk images they boot with
    ramdisk_id: str | None = None
    # where each use was found: "disk <path>", "libvirt domain <name>", "process <pid> <comm>",
    # "pin"
    in_use_by: tuple[str, ...] = ()

    @property
    def used(self) -> bool:
        """Something uses it now (a pin alone is a use to come, not one)."""
        return bool(self.users) or any(s != PIN for s in self.in_use_by)


PIN = "pin"
STATE_IMAGE_GONE = "quarantined, image gone"


def list_entries(
    layout: Layout, usage: Usage | None = None, *, holders: Holders | None = None
) -> list[BaseEntry]:
    """Every entry of ``_base``; ``usage`` is scanned (with ``holders``) when not given."""
    base_dir = layout.base_dir
    try:
        names = sorted(os.listdir(base_dir))
    except FileNotFoundError:
        return []
    if usage is None:
        usage = scan(layout.instances_path, holders)
    out: list[BaseEntry] = []
    sources: dict[str, tuple[str, ...]] = {}
    for name in names:
        if name == META_DIRNAME:
            continue
        path = base_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        allocated = st.st_blocks * 512
        who = tuple(sorted(usage.users_of(path, st)))
        sources[name] = _sources(layout, name, usage.holders_of(path, st))
        meta = md.read_meta(layout.paths_for_name(name).meta) if SHA1_RE.match(name) else None
        if not stat.S_ISREG(st.st_mode) and meta is not None:
            # a directory or symlink where a base was: failed, so the pass moves it aside
            out.append(
                BaseEntry(
                    name,
                    path,
                    "base",
                    meta.image_id,
                    meta.name,
                    None,
                    meta.disk_format,
                    allocated,
                    st.st_size,
                    None,
                    who,
                    md.last_used(layout.paths_for_name(name).meta),
                    md.STATE_FAILED,
                    "not a regular file (a directory or symlink where the base was)",
                )
            )
            continue
        if not stat.S_ISREG(st.st_mode):
            out.append(
                BaseEntry(
                    name,
                    path,
                    "unknown",
                    None,
                    None,
                    None,
                    None,
                    allocated,
                    st.st_size,
                    None,
                    who,
                    None,
                    "stray",
                    "not a regular file (symlink or directory)",
                )
            )
            continue
        if SHA1_RE.match(name):
            paths = layout.paths_for_name(name)
            if meta is None:
                out.append(
                    BaseEntry(
                        name,
                        path,
                        "base",
                        None,
                        None,
                        None,
                        None,
                        allocated,
                        st.st_size,
                        None,
                        who,
                        st.st_mtime,
                        "foreign",
                        "no cowfleet metadata",
                    )
                )
                continue
            state = meta.state
            if state == md.STATE_VERIFIED and st.st_size != meta.file_size:
                state = md.STATE_FAILED
            out.append(
                BaseEntry(
                    name,
                    path,
                    "base",
                    meta.image_id,
                    meta.name,
                    meta.file_format,
                    meta.disk_format,
                    allocated,
                    st.st_size,
                    meta.virtual_size,
                    who,
                    md.last_used(paths.meta),
                    state,
                    meta.failure,
                    meta.kernel_id,
                    meta.ramdisk_id,
                )
            )
            continue
        stem, dot, _suffix = name.partition(".")
        if SHA1_RE.match(stem) and ("." + _suffix) in (PART_SUFFIX, CONVERTED_SUFFIX) and dot:
            paths = layout.paths_for_name(stem)
            record = md.read_part_meta(paths.part_meta)
            kind = "part" if name.endswith(PART_SUFFIX) else "converted"
            resumable = kind == "part" and record is not None
            out.append(
                BaseEntry(
                    name,
                    path,
                    kind,
                    record.image_id if record else None,
                    None,
                    None,
                    None,
                    allocated,
                    st.st_size,
                    None,
                    who,
                    st.st_mtime,
                    "resumable" if resumable else "stray",
                    "download in progress or interrupted; the next fetch resumes it"
                    if resumable
                    else "leftover file, never used as a base",
                )
            )
            continue
        kind = (
            "ephemeral"
            if name.startswith("ephemeral_")
            else ("swap" if name.startswith("swap_") else "unknown")
        )
        out.append(
            BaseEntry(
                name,
                path,
                kind,
                None,
                None,
                None,
                None,
                allocated,
                st.st_size,
                None,
                who,
                st.st_mtime,
                "unverified" if kind != "unknown" else "stray",
                None if kind != "unknown" else "unknown file in _base",
            )
        )
    out = [replace(e, in_use_by=sources[e.name]) for e in out]
    out.extend(_quarantined(layout, usage))
    return out


def _sources(layout: Layout, name: str, found: frozenset[str]) -> tuple[str, ...]:
    """The places a use of ``_base/<name>`` was found, and ``pin`` while one is held."""
    by = sorted(found)
    try:
        pinned = pins.is_pinned(layout.locks_dir, name)
    except UsageError:  # a name no pin file can have
        pinned = False
    return (*by, PIN) if pinned else tuple(by)


def _quarantined(layout: Layout, usage: Usage) -> list[BaseEntry]:
    """Bases the cache manager moved aside after they failed verification."""
    qdir = layout.quarantine_dir
    try:
        names = sorted(n for n in os.listdir(qdir) if not n.endswith(".json"))
    except OSError:
        return []
    out: list[BaseEntry] = []
    for name in names:
        path = qdir / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        record = md.read_json(path.with_name(name + ".json")) or {}
        users = record.get("users")
        # still held: processes keep their open file; disks whose base is now missing
        held = usage.holders_of(path, st) | usage.labels_by_base_name.get(
            str(record.get("name")), frozenset()
        )
        out.append(
            BaseEntry(
                f"{META_DIRNAME}/{QUARANTINE_DIRNAME}/{name}",
                path,
                "quarantined",
                _text(record.get("image_id")),
                _text(record.get("image_name")),
                None,
                None,
                st.st_blocks * 512,
                st.st_size,
                None,
                tuple(str(u) for u in users) if isinstance(users, list) else (),
                st.st_mtime,
                STATE_IMAGE_GONE if record.get("image_gone_at") else "quarantined",
                _text(record.get("reason")) or "failed verification",
                in_use_by=tuple(sorted(held)),
            )
        )
    return out


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class QuarantineRecord:
    """One base the cache manager moved aside, as its ``.json`` record tells."""

    file: Path  # the quarantined file
    record: Path  # its .json record
    name: str  # the base name it had in _base
    image_id: str | None
    reason: str
    image_gone: bool
    data: dict[str, object]


def quarantine_records(layout: Layout) -> dict[str, list[QuarantineRecord]]:
    """Records of every quarantined base, by the name it had in ``_base``."""
    qdir = layout.quarantine_dir
    try:
        names = sorted(n for n in os.listdir(qdir) if n.endswith(".json"))
    except OSError:
        return {}
    out: dict[str, list[QuarantineRecord]] = {}
    for rec_name in names:
        data = md.read_json(qdir / rec_name)
        name = data.get("name") if data else None
        if not data or not isinstance(name, str) or not SHA1_RE.match(name):
            continue
        out.setdefault(name, []).append(
            QuarantineRecord(
                file=qdir / rec_name[: -len(".json")],
                record=qdir / rec_name,
                name=name,
                image_id=_text(data.get("image_id")),
                reason=_text(data.get("reason")) or "failed verification",
                image_gone=bool(data.get("image_gone_at")),
                data=data,
            )
        )
    return out


def base_note(layout: Layout, base: Path) -> str | None:
    """What an instance disk's missing base became, for ``server show``; None: nothing to say."""
    if os.path.lexists(base) or base.parent != layout.base_dir:
        return None
    records = quarantine_records(layout).get(base.name)
    if not records:
        return f"base {base} is missing"
    last = records[-1]
    text = f"base {base} was quarantined ({last.reason})"
    if last.image_gone:
        return (
            f"{text}; image {last.image_id} is gone from the image service "
            "(quarantined, image gone): the server cannot boot until it is restored"
        )
    return f"{text}; the node's cache manager fetches image {last.image_id} again"
