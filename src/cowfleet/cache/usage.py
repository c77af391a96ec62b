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

A disk file or an instance folder that is a symlink is followed: the file it
leads to is read like any other (a relative backing name is resolved against
both the link's folder and the target's). A link that cannot be followed
(dangling, a loop, no permission) is reported as unreadable.

Uses found elsewhere come in as :class:`Holders` (see
:mod:`cowfleet.cache.holders`): the disks of every libvirt domain defined on
the node, whose chains are read here the same way wherever the overlay lives,
and the files running processes hold open or mapped. Every use is labelled
with where it was found (``disk <path>``, ``libvirt domain <name>``,
``process <pid> <comm>``), so ``cache list`` and ``cache clean`` can say why a
base stays.

Errors lean one way: a disk that cannot be read is reported in
:attr:`Usage.unreadable`, and the cache manager then deletes nothing, since it
cannot know what that disk needs.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
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
class HeldFile:
    """A file something outside the instance folders uses.

    ``path``: a disk whose backing chain is read (a libvirt domain's disk);
    ``ident``: a file known by identity only (one a process holds open).
    ``chain`` is False for a disk whose first bytes belong to the guest (a raw
    disk): it is counted itself but never parsed, since a guest could forge a
    qcow2 header there.
    """

    label: str  # "libvirt domain web1", "process 812 qemu-system-x86"
    path: str | None = None
    ident: FileId | None = None
    chain: bool = True


@dataclass(frozen=True)
class Holders:
    """What the sources outside the instance folders found, and what they could not read."""

    files: tuple[HeldFile, ...] = ()
    problems: tuple[Problem, ...] = ()  # a source that could not be read: trust nothing

    def __add__(self, other: Holders) -> Holders:
        return Holders(self.files + other.files, self.problems + other.problems)


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
    # file -> where its uses were found ("disk <path>", "libvirt domain <name>", ...)
    labels_by_id: Mapping[FileId, frozenset[str]] = field(default_factory=dict)
    labels_by_base_name: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def users_of(self, path: Path | str, st: os.stat_result | None = None) -> frozenset[str]:
        """Instance folders whose disks have ``path`` (a file in ``_base``) in their chain."""
        return _lookup(self.by_id, self.by_base_name, path, st)

    def holders_of(self, path: Path | str, st: os.stat_result | None = None) -> frozenset[str]:
        """Where every use of ``path`` was found: disks, libvirt domains, processes."""
        return _lookup(self.labels_by_id, self.labels_by_base_name, path, st)

    @property
    def missing_bases(self) -> frozenset[str]:
        """Names of ``_base`` files some chain needs but that are gone."""
        return frozenset(self.by_base_name) | frozenset(self.labels_by_base_name)


def _lookup(
    by_id: Mapping[FileId, frozenset[str]],
    by_name: Mapping[str, frozenset[str]],
    path: Path | str,
    st: os.stat_result | None,
) -> frozenset[str]:
    found: frozenset[str] = frozenset()
    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
    if st is not None:
        found = by_id.get((st.st_dev, st.st_ino), found)
    named = by_name.get(os.path.basename(os.fspath(path)))
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
        self.labels_by_id: dict[FileId, set[str]] = {}
        self.labels_by_base_name: dict[str, set[str]] = {}
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

    def _count(self, folder: str | None, label: str, ident: FileId) -> None:
        if folder is not None:
            self.by_id.setdefault(ident, set()).add(folder)
        self.labels_by_id.setdefault(ident, set()).add(label)

    def _disk(self, folder: str | None, label: str, path: str, *, parse: bool = True) -> None:
        """One disk (an instance's, or a libvirt domain's): the file and its whole chain.

        A symlink is followed; a relative backing name is resolved against the
        folder the disk was named in and, when it is a link, the target's too.
        """
        who = folder if folder is not None else label
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                self.unreadable.append(Problem(who, path, "symlinked disk leads nowhere"))
            elif folder is None and os.path.basename(os.path.dirname(path)) == "_base":
                # a domain naming a missing base directly (a raw disk, a <backingStore>)
                name = os.path.basename(path)
                self.labels_by_base_name.setdefault(name, set()).add(label)
            return  # a disk that is gone backs nothing
        except OSError as exc:
            self.unreadable.append(Problem(who, path, f"cannot follow the disk: {exc.strerror}"))
            return
        if not stat.S_ISREG(st.st_mode):
            return
        linked = os.path.islink(path)
        if linked or folder is None:
            self._count(folder, label, (st.st_dev, st.st_ino))  # the file itself may be a base
        if not parse:
            return
        try:
            got = read_backing(path)
        except (OSError, CowfleetError) as exc:
            self.unreadable.append(Problem(who, path, f"cannot read header: {exc}"))
            return
        if got is None or not got[0]:
            return
        backing = got[1]
        self.disks += 1
        if backing is None:
            return
        if backing.startswith("json:") or "\0" in backing:
            self.unreadable.append(Problem(who, path, "backing file name is json:"))
            return
        dirs = [os.path.dirname(path)]
        if linked:
            real = os.path.dirname(os.path.realpath(path))
            if real != dirs[0]:
                dirs.append(real)
        for where in dirs:
            below = self.link(os.path.normpath(os.path.join(where, backing)))
            for ident in (below.ident, *below.below):
                if ident is not None:
                    self._count(folder, label, ident)
            for base in below.base_names:
                if folder is not None:
                    self.by_base_name.setdefault(base, set()).add(folder)
                self.labels_by_base_name.setdefault(base, set()).add(label)
            if below.problem:
                self.unreadable.append(Problem(who, path, below.problem))
            elif below.missing:
                self.broken.append(Problem(who, path, f"backing file {below.missing} is missing"))

    # one instance folder
    def folder(self, name: str, path: str) -> None:
        try:
            entries = [e for e in os.scandir(path) if e.name.startswith("disk")]
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(path):  # a dangling link: what it led to is unknown
                self.unreadable.append(Problem(name, path, "symlinked folder leads nowhere"))
            return  # deleted (or renamed) since the listing: what is gone uses nothing
        except OSError as exc:
            self.unreadable.append(Problem(name, path, f"cannot list the folder: {exc.strerror}"))
            return
        self.instances += 1
        pinned = _pinned_formats(path) if any(e.name == DISK_INFO for e in entries) else {}
        for entry in entries:
            if entry.name == DISK_INFO:
                continue
            qcow2 = pinned.get(entry.name, "qcow2") == "qcow2"
            if not qcow2 and not entry.is_symlink():
                continue
            self._disk(name, f"disk {entry.path}", entry.path, parse=qcow2)

    def held(self, holders: Holders) -> None:
        """Files used from outside the instance folders."""
        self.unreadable.extend(holders.problems)
        for held in holders.files:
            if held.ident is not None:
                self._count(None, held.label, held.ident)
            if held.path is not None:
                self._disk(None, held.label, held.path, parse=held.chain)

    def run(self, holders: Holders) -> Usage:
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
                if entry.is_symlink():
                    if not _is_dir_or_dangling(entry.path):
                        continue  # a link to a file: not an instance folder
                elif not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            self.folder(entry.name, entry.path)
        self.held(holders)
        return self.usage()

    def usage(self) -> Usage:
        return Usage(
            instances_path=Path(self.root),
            instances=self.instances,
            disks=self.disks,
            by_id={k: frozenset(v) for k, v in self.by_id.items()},
            by_base_name={k: frozenset(v) for k, v in self.by_base_name.items()},
            unreadable=tuple(self.unreadable),
            broken=tuple(self.broken),
            labels_by_id={k: frozenset(v) for k, v in self.labels_by_id.items()},
            labels_by_base_name={k: frozenset(v) for k, v in self.labels_by_base_name.items()},
        )


def _is_dir_or_dangling(path: str) -> bool:
    """Whether a symlink leads to a folder or cannot be followed (then it is reported)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return True


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


def scan(instances_path: Path, holders: Holders | None = None) -> Usage:
    """Read the backing chain of every instance disk under ``instances_path``.

    ``holders``: uses found outside the instance folders (libvirt domains,
    processes); their disks' chains are read here too.
    """
    return _Scanner(instances_path).run(holders or Holders())


def scan_holders(holders: Holders) -> Usage:
    """Only the uses found outside the instance folders: held files and domain disks' chains."""
    scanner = _Scanner(Path())
    scanner.held(holders)
    return scanner.usage()
