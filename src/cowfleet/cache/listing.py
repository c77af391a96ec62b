"""``cache list``: every file in ``_base`` with what it is and who uses it.

Users of a base are the instance disks ``<instances_path>/<uuid>/disk*`` whose
qcow2 header names it as backing file. Headers are read with
:func:`cowfleet.formats.qcow2.parse_header` on the first 64 KiB, so this also
works on a Nova node's instances path (no qemu-img, no subprocess).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import (
    CONVERTED_SUFFIX,
    META_DIRNAME,
    PART_SUFFIX,
    SHA1_RE,
    Layout,
    is_image_id,
)
from cowfleet.errors import CowfleetError

log = logging.getLogger(__name__)
HEAD = 64 * 1024
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class BaseEntry:
    name: str  # file name in _base
    path: Path
    kind: str  # base | part | converted | ephemeral | swap | unknown
    image_id: str | None
    image_name: str | None
    format: str | None  # format of the file
    disk_format: str | None  # declared Glance disk_format
    allocated: int  # bytes on disk (st_blocks * 512)
    size: int  # apparent size
    virtual_size: int | None
    users: tuple[str, ...]  # instance uuids backed by this file
    last_used: float | None
    state: str  # verified | failed | unverified | resumable | stray | foreign
    failure: str | None = None


def _read_head(path: Path) -> tuple[bytes, int] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return os.pread(fd, HEAD, 0), st.st_size
    except OSError:
        return None
    finally:
        os.close(fd)


def backing_users(instances_path: Path) -> dict[str, list[str]]:
    """Map of normalised backing path -> instance uuids whose disk* names it."""
    from cowfleet.formats.qcow2 import parse_header

    users: dict[str, list[str]] = {}
    try:
        entries = list(os.scandir(instances_path))
    except OSError:
        return users
    for inst in entries:
        if not is_image_id(inst.name) or not inst.is_dir(follow_symlinks=False):
            continue
        try:
            disks = [d for d in os.scandir(inst.path) if d.name.startswith("disk")]
        except OSError:
            continue
        for disk in disks:
            head = _read_head(Path(disk.path))
            if head is None or not head[0].startswith(QCOW2_MAGIC):
                continue
            try:
                header = parse_header(head[0], file_size=head[1])
            except CowfleetError as exc:
                log.debug("cannot parse %s: %s", disk.path, exc)
                continue
            backing = header.backing_file
            if not backing or backing.startswith("json:"):
                continue
            full = os.path.normpath(os.path.join(inst.path, backing))
            bucket = users.setdefault(full, [])
            if inst.name not in bucket:
                bucket.append(inst.name)
    return users


def _users_of(path: Path, users: dict[str, list[str]]) -> tuple[str, ...]:
    found: list[str] = []
    for key in {os.path.normpath(str(path)), os.path.realpath(path)}:
        for u in users.get(key, []):
            if u not in found:
                found.append(u)
    return tuple(sorted(found))


def list_entries(layout: Layout) -> list[BaseEntry]:
    base_dir = layout.base_dir
    try:
        names = sorted(os.listdir(base_dir))
    except FileNotFoundError:
        return []
    raw_users = backing_users(layout.instances_path)
    users: dict[str, list[str]] = {}
    for k, v in raw_users.items():
        users.setdefault(k, []).extend(v)
        real = os.path.realpath(k)
        if real != k:
            users.setdefault(real, []).extend(v)
    out: list[BaseEntry] = []
    for name in names:
        if name == META_DIRNAME:
            continue
        path = base_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        allocated = st.st_blocks * 512
        who = _users_of(path, users)
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
            meta = md.read_meta(paths.meta)
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
    return out
