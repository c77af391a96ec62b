"""The node as one clean pass sees it: every fact the decision needs, read once.

:func:`gather` does all the reading (the ``_base`` listing with sizes, times
and metadata, every disk's backing chain and the injected in-use sources, pin
tokens and pins, download locks, left-over temporary files, quarantine
records, the filesystem's free space, the clock) and returns a frozen
:class:`Snapshot`. :func:`cowfleet.cache.plan.plan` decides from it alone.

Reading is read-only: no lock is taken, no file created, no time stamp
changed, so a dry run is safe on a live Nova compute node's directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cowfleet.cache import pins
from cowfleet.cache.holders import HolderSource, collect
from cowfleet.cache.layout import META_DIRNAME, Layout
from cowfleet.cache.listing import BaseEntry, list_entries
from cowfleet.cache.lock import is_held, lock_path
from cowfleet.cache.usage import FileId, Problem, scan
from cowfleet.errors import LocalIOError, UsageError

TEMP_SUFFIX = ".tmp"
PART_KINDS = ("part", "converted")


@dataclass(frozen=True)
class FsSpace:
    """The filesystem holding ``_base``, in bytes."""

    total: int
    available: int  # free to an unprivileged writer (f_bavail)


@dataclass(frozen=True)
class FileFacts:
    """One file of ``_base`` (or a quarantined or temporary file) and what was read about it."""

    entry: BaseEntry
    ident: FileId | None = None  # (st_dev, st_ino) when read: the executor checks it again
    token: bytes = b""  # its pin file's token, read before the disks were scanned
    download_held: bool = False  # a part/converted file whose download lock is held


@dataclass(frozen=True)
class Snapshot:
    """Everything one pass decides from."""

    instances_path: str
    at: float  # the clock when the pass began
    files: tuple[FileFacts, ...]
    fs: FsSpace | None = None  # None: could not be read
    instances: int = 0  # folders scanned
    disks: int = 0  # qcow2 disks read
    unreadable: tuple[Problem, ...] = ()  # what they use is unknown: nothing may go
    broken: tuple[Problem, ...] = ()
    missing_bases: tuple[str, ...] = ()  # _base names some disk needs but that are gone


def pinnable(name: str) -> bool:
    """Whether ``name`` can have a pin file; other names are no file cowfleet or Nova makes."""
    try:
        pins.pin_path(Path(), name)  # only checks the name
    except UsageError:
        return False
    return True


def gather(
    layout: Layout,
    *,
    sources: Sequence[HolderSource] = (),
    clock: Callable[[], float],
    statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
) -> Snapshot:
    """Read the node once. Raises :class:`LocalIOError` when ``_base`` cannot be listed."""
    now = clock()
    locks = layout.locks_dir
    try:
        names = [n for n in os.listdir(layout.base_dir) if n != META_DIRNAME]
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise LocalIOError(
            f"cannot list {layout.base_dir}: {exc.strerror}", path=str(layout.base_dir)
        ) from exc
    # Tokens before the scan: a pin released during the scan changes its token.
    tokens = {n: pins.token(locks, n) for n in names if pinnable(n)}
    usage = scan(layout.instances_path, collect(tuple(sources), layout.base_dir))
    files = [_facts(layout, e, tokens) for e in list_entries(layout, usage)]
    files += _temp_files(layout)
    return Snapshot(
        instances_path=str(layout.instances_path),
        at=now,
        files=tuple(files),
        fs=_space(statvfs, layout.base_dir),
        instances=usage.instances,
        disks=usage.disks,
        unreadable=usage.unreadable,
        broken=usage.broken,
        missing_bases=tuple(sorted(usage.missing_bases)),
    )


def ident_of(path: Path) -> FileId | None:
    """``(st_dev, st_ino)`` of ``path`` itself (a link is not followed); None when gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _facts(layout: Layout, e: BaseEntry, tokens: Mapping[str, bytes]) -> FileFacts:
    held = False
    if e.kind in PART_KINDS:
        held = is_held(lock_path(layout.locks_dir, e.name.partition(".")[0]))
    return FileFacts(e, ident_of(e.path), tokens.get(e.name, b""), held)


def _temp_files(layout: Layout) -> list[FileFacts]:
    """Temporary metadata files (``.cowfleet/.*.tmp``): a killed writer's, once old."""
    out: list[FileFacts] = []
    try:
        entries = sorted(os.scandir(layout.meta_dir), key=lambda d: d.name)
    except OSError:
        return out
    for ent in entries:
        if not (ent.name.startswith(".") and ent.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            st = ent.stat(follow_symlinks=False)
        except OSError:
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
        out.append(FileFacts(entry, (st.st_dev, st.st_ino)))
    return out


def _space(statvfs: Callable[[Path], os.statvfs_result], base_dir: Path) -> FsSpace | None:
    try:
        fs = statvfs(base_dir)
    except OSError:
        return None
    return FsSpace(fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize)
