"""Cached, formatted ephemeral and swap bases in ``_base``.

An ephemeral disk is an overlay on a base holding an empty filesystem; a swap
disk is an overlay on a base made by ``mkswap``. cowfleet makes these bases
itself, so they are trusted (no inspection), but their names are derived from
numbers and a fixed vocabulary, never from user strings:

- ``ephemeral_<GiB>_<fs>_<label>_<hash>``: the filesystem and label are part
  of the name and the hash covers the whole mkfs command, so two filesystems
  never share a base (Nova's name ignores the filesystem type).
- ``swap_<MiB>``.

Bases are built as a sparse raw file under a temporary name, formatted,
made read-only (0444) and renamed into place while holding the base's lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cowfleet import proc
from cowfleet.errors import LocalIOError, StorageFullError, ValidationError

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
DEFAULT_LABEL = "ephemeral0"
BASE_MODE = 0o444
# mkfs argument templates per filesystem; "{label}" and "{path}" are filled in.
MKFS_TEMPLATES: dict[str, tuple[str, ...]] = {
    "ext2": ("mkfs", "-t", "ext2", "-F", "-q", "-L", "{label}", "{path}"),
    "ext3": ("mkfs", "-t", "ext3", "-F", "-q", "-L", "{label}", "{path}"),
    "ext4": ("mkfs", "-t", "ext4", "-F", "-q", "-L", "{label}", "{path}"),
    "xfs": ("mkfs", "-t", "xfs", "-f", "-q", "-L", "{label}", "{path}"),
    "vfat": ("mkfs", "-t", "vfat", "-n", "{label}", "{path}"),
}
_LABEL_RE = re.compile(r"^[a-z0-9]{1,11}$")

Runner = Callable[..., proc.Completed]
LockFactory = Callable[[Path, str], AbstractContextManager[None]]


@dataclass(frozen=True)
class LocalBase:
    """A base cowfleet made itself (ephemeral or swap): trusted, raw."""

    path: Path
    format: str
    virtual_size: int
    created: bool


def _check_label(label: str) -> None:
    if not _LABEL_RE.match(label):
        raise ValidationError(f"filesystem label must be 1-11 of [a-z0-9], not {label!r}")


def mkfs_argv(fs: str, label: str, path: Path | str) -> list[str]:
    """The mkfs command that formats ``path`` with ``fs`` and ``label``."""
    if fs not in MKFS_TEMPLATES:
        known = ", ".join(sorted(MKFS_TEMPLATES))
        raise ValidationError(f"unsupported ephemeral filesystem {fs!r} (supported: {known})")
    _check_label(label)
    return [a.format(label=label, path=path) for a in MKFS_TEMPLATES[fs]]


def ephemeral_base_name(size_gb: int, fs: str, label: str = DEFAULT_LABEL) -> str:
    """``ephemeral_<GiB>_<fs>_<label>_<7 hex>``; the hash covers the mkfs command."""
    if size_gb <= 0:
        raise ValidationError(f"ephemeral size must be positive, not {size_gb}")
    command = " ".join(mkfs_argv(fs, label, "BASE"))
    digest = hashlib.sha256(command.encode()).hexdigest()[:7]
    return f"ephemeral_{size_gb}_{fs}_{label}_{digest}"


def swap_base_name(size_mb: int) -> str:
    if size_mb <= 0:
        raise ValidationError(f"swap size must be positive, not {size_mb}")
    return f"swap_{size_mb}"


@contextlib.contextmanager
def _temp_file(path: Path) -> Iterator[Path]:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _ensure_base(
    path: Path,
    size: int,
    format_argv: Callable[[Path], list[str]],
    *,
    locks_dir: Path,
    lock: LockFactory,
    runner: Runner,
) -> LocalBase:
    if path.is_file():  # fast path: no lock needed to use an existing base
        return LocalBase(path=path, format="raw", virtual_size=path.stat().st_size, created=False)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        locks_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalIOError(f"cannot create {path.parent}: {exc.strerror}") from exc
    with lock(locks_dir, path.name):
        if path.is_file():
            return LocalBase(path, "raw", path.stat().st_size, created=False)
        with _temp_file(path) as tmp:
            try:
                with open(tmp, "wb") as fh:
                    fh.truncate(size)  # sparse
            except OSError as exc:
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                cls = StorageFullError if full else LocalIOError
                raise cls(f"cannot create {tmp}: {exc.strerror}", path=str(tmp)) from exc
            runner(format_argv(tmp), timeout=300.0)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, BASE_MODE)
            os.rename(tmp, path)
        log.info("created base %s (%d bytes)", path, size)
        return LocalBase(path=path, format="raw", virtual_size=size, created=True)


def ensure_ephemeral_base(
    base_dir: Path,
    locks_dir: Path,
    size_gb: int,
    fs: str,
    *,
    label: str = DEFAULT_LABEL,
    lock: LockFactory,
    runner: Runner = proc.run,
) -> LocalBase:
    """The formatted ephemeral base for (size, fs, label), made once per node."""
    name = ephemeral_base_name(size_gb, fs, label)
    return _ensure_base(
        base_dir / name,
        size_gb * GIB,
        lambda tmp: mkfs_argv(fs, label, tmp),
        locks_dir=locks_dir,
        lock=lock,
        runner=runner,
    )


def ensure_swap_base(
    base_dir: Path,
    locks_dir: Path,
    size_mb: int,
    *,
    lock: LockFactory,
    runner: Runner = proc.run,
) -> LocalBase:
    """The ``mkswap`` base of ``size_mb`` MiB, made once per node."""
    name = swap_base_name(size_mb)
    return _ensure_base(
        base_dir / name,
        size_mb * MIB,
        lambda tmp: ["mkswap", str(tmp)],
        locks_dir=locks_dir,
        lock=lock,
        runner=runner,
    )
