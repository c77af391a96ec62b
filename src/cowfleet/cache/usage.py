"""Which files back which instance disks, read from the disks themselves.

A base is in use when any instance disk has it anywhere in its backing chain.
The chain is read from qcow2 headers in Python (no qemu-img, no subprocess),
followed to its end, so the answer is the same whichever node wrote the disk:
a directory shared by several nodes needs no host registry, and a real Nova
compute node's ``/var/lib/nova/instances`` is read the same way.

What is scanned: every sub-directory of the instances path except ``_base``,
``locks`` and cowfleet's name claims, hidden ones included (``.<uuid>.tmp`` is
a provisioning in progress, Nova's ``<uuid>_resize`` a resize), and in each
one every file whose name starts with ``disk`` (``disk``, ``disk.local``,
``disk.swap``, ``disk.eph0``, ``disk.rescue``...) except ``disk.info``.
A disk that ``disk.info`` pins to a format other than qcow2 is not parsed:
its first bytes belong to the guest, which could forge a header there.

Files are identified by ``(st_dev, st_ino)``, so a base is matched whatever
spelling of its path a disk uses (symlinked or bind-mounted instances paths).
A backing file that is missing but named ``.../_base/<name>`` is still counted
as a use of ``_base/<name>`` (a directory mounted elsewhere on another node).

Errors lean one way: a disk that cannot be read is reported in
:attr:`Usage.unreadable`, and the cache manager then deletes nothing, since it
cannot know what that disk needs.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cowfleet.errors import CowfleetError, LocalIOError
from cowfleet.formats.qcow2 import MAGIC, parse_header

HEAD = 4096  # header, extensions and backing name of nearly every qcow2 file
HEAD_MAX = 64 * 1024  # re-read this much when the first read was not enough
MAX_DEPTH = 64  # longest chain followed before it is called a loop
SKIP_DIRS = frozenset({"_base", "locks", ".names"})
DISK_INFO = "disk.info"

FileId = tuple[int, int]


@dataclass(frozen=True)
class Problem:
    """A disk whose chain could not be read completely, and why."""

    instance: str
    path: str
    reason: str


@dataclass(frozen=True)
class Usage:
    """Users of every file found in a backing chain under one instances path."""

    instances_path: Path
    instances: int  # folders scanned
    disks: int  # qcow2 disks read
    by_id: Mapping[FileId, frozenset[str]]  # chain file -> instance folders using it
    by_base_name: Mapping[str, frozenset[str]]  # missing ".../_base/<name>" -> folders
    unreadable: tuple[Problem, ...] = ()  # chains that could not be read: trust nothing
    broken: tuple[Problem, ...] = ()  # chains naming a backing file that is gone

    def users_of(self, path: Path | str, st: os.stat_result | None = None) -> frozenset[str]:
        """Instance folders whose disks have ``path`` (a file in ``_base``) in their chain."""
        found: frozenset[str] = frozenset()
        if st is None:
            try:
                st = os.stat(path)
            except OSError:
                st = None
        if st is not None:
            found = self.by_id.get((st.st_dev, st.st_ino), found)
        named = self.by_base_name.get(os.path.basename(os.fspath(path)))
        return found | named if named else found


@dataclass
class _Link:
    """A file met as a backing file: its identity and what it is backed by."""

    ident: FileId | None  # None: missing or not a file
    below: tuple[FileId, ...] = ()  # identities further down its chain
    base_names: tuple[str, ...] = ()  # missing "_base/<name>" files in its chain
    problem: str | None = None  # the chain below could not be read
    missing: str | None = None  # a backing file in the chain is gone


def read_backing(path: str) -> tuple[bool, str | None] | None:
    """(is qcow2, backing file name) of a regular file; None when it is not one or is gone.

    Reads 4 KiB, and 64 KiB when the backing name or the header extensions lie
    further. Any error other than a missing file is raised (EACCES...), and so is a
    header qemu would not accept: the callers then report the disk as unreadable
    instead of silently not counting its chain.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        head = os.pread(fd, HEAD, 0)
        if head[:4] != MAGIC:
            return False, None
        if len(head) == HEAD:
            try:
                return True, _backing_of(head, st.st_size)
            except CowfleetError:  # extensions or the name past 4 KiB: read more
                head = os.pread(fd, HEAD_MAX, 0)
        return True, _backing_of(head, st.st_size)
    finally:
        os.close(fd)


def _backing_of(head: bytes, size: int) -> str | None:
    """The backing file name of a qcow2 header; raises on a bad (or cut) header."""
    header = parse_header(head, file_size=size)
    if header.backing_file_offset and header.backing_file is None:
        raise CowfleetError("backing file name lies beyond the bytes read")
    return header.backing_file or None


class _Scanner:
    def __init__(self, instances_path: Path) -> None:
        self.root = os.fspath(instances_path)
        self.links: dict[str, _Link] = {}
        self.by_id: dict[FileId, set[str]] = {}
        self.by_base_name: dict[str, set[str]] = {}
        self.unreadable: list[Problem] = []
        self.broken: list[Problem] = []
        self.instances = 0
        self.disks = 0

    # a backing file, memoised: many disks share one base
    def link(self, path: str, depth: int = 0) -> _Link:
        cached = self.links.get(path)
        if cached is not None:
            return cached
        if depth > MAX_DEPTH:
            return _Link(None, problem=f"backing chain deeper than {MAX_DEPTH} (a loop?)")
        self.links[path] = _Link(None, problem="backing chain loops back to " + path)
        result = self._resolve(path, depth)
        self.links[path] = result
        return result

    def _resolve(self, path: str, depth: int) -> _Link:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            parent, name = os.path.split(path)
            names = (name,) if os.path.basename(parent) == "_base" else ()
            return _Link(None, base_names=names, missing=path)
        except OSError as exc:  # EACCES, ELOOP...: the chain below it is unknown
            return _Link(None, problem=f"cannot stat backing file {path}: {exc.strerror}")
        ident = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode):  # a block device backing: nothing to read below
            return _Link(ident)
        try:
            got = read_backing(path)
            if got is None:
                return _Link(ident, problem=f"cannot read backing file {path}")
            backing = got[1]
        except (OSError, CowfleetError) as exc:
            return _Link(ident, problem=f"cannot read the header of {path}: {exc}")
        if backing is None:
            return _Link(ident)
        if backing.startswith("json:") or "\0" in backing:
            return _Link(ident, problem=f"{path} names a backing file qemu would parse: json:")
        below = self.link(os.path.normpath(os.path.join(os.path.dirname(path), backing)), depth + 1)
        ids = (below.ident, *below.below) if below.ident is not None else below.below
        return _Link(ident, ids, below.base_names, below.problem, below.missing)

    # one instance folder
    def folder(self, name: str, path: str) -> None:
        try:
            entries = [e for e in os.scandir(path) if e.name.startswith("disk")]
        except (FileNotFoundError, NotADirectoryError):
            return  # deleted (or renamed) since the listing: what is gone uses nothing
        except OSError as exc:
            self.unreadable.append(Problem(name, path, f"cannot list the folder: {exc.strerror}"))
            return
        self.instances += 1
        pinned = _pinned_formats(path) if any(e.name == DISK_INFO for e in entries) else {}
        for entry in entries:
            if entry.name == DISK_INFO or pinned.get(entry.name, "qcow2") != "qcow2":
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                got = read_backing(entry.path)
            except (OSError, CowfleetError) as exc:
                self.unreadable.append(Problem(name, entry.path, f"cannot read header: {exc}"))
                continue
            if got is None or not got[0]:
                continue
            backing = got[1]
            self.disks += 1
            if backing is None:
                continue
            if backing.startswith("json:") or "\0" in backing:
                self.unreadable.append(Problem(name, entry.path, "backing file name is json:"))
                continue
            below = self.link(os.path.normpath(os.path.join(path, backing)))
            if below.ident is not None:
                self.by_id.setdefault(below.ident, set()).add(name)
            for ident in below.below:
                self.by_id.setdefault(ident, set()).add(name)
            for base in below.base_names:
                self.by_base_name.setdefault(base, set()).add(name)
            if below.problem:
                self.unreadable.append(Problem(name, entry.path, below.problem))
            elif below.missing:
                self.broken.append(
                    Problem(name, entry.path, f"backing file {below.missing} is missing")
                )

    def run(self) -> Usage:
        try:
            top = list(os.scandir(self.root))
        except FileNotFoundError:
            top = []
        except OSError as exc:
            raise LocalIOError(f"cannot list {self.root}: {exc.strerror}", path=self.root) from exc
        for entry in top:
            if entry.name in SKIP_DIRS:
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            self.folder(entry.name, entry.path)
        return Usage(
            instances_path=Path(self.root),
            instances=self.instances,
            disks=self.disks,
            by_id={k: frozenset(v) for k, v in self.by_id.items()},
            by_base_name={k: frozenset(v) for k, v in self.by_base_name.items()},
            unreadable=tuple(self.unreadable),
            broken=tuple(self.broken),
        )


def _pinned_formats(folder: str) -> dict[str, str]:
    """``disk.info`` of a folder as {file name: format}; empty when unreadable."""
    try:
        fd = os.open(os.path.join(folder, DISK_INFO), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        raw = os.read(fd, 1 << 16)
    except OSError:
        return {}
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {os.path.basename(str(k)): str(v) for k, v in data.items()}


def scan(instances_path: Path) -> Usage:
    """Read the backing chain of every instance disk under ``instances_path``."""
    return _Scanner(instances_path).run()
