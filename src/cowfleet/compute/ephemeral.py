"""Cached, formatted ephemeral and swap bases in ``_base``.

An ephemeral disk is an overlay on a base holding an empty filesystem; a swap
disk is an overlay on a base made by ``mkswap``. cowfleet makes these bases
itself; their names are derived from numbers and a fixed vocabulary, never from
user strings:

- ``ephemeral_<GiB>_<fs>_<label>_<hash>``: the filesystem and label are part
  of the name and the hash covers the whole mkfs command, so two filesystems
  never share a base (Nova's name ignores the filesystem type).
- ``swap_<MiB>``.

Bases are built as a sparse raw file under a fresh random temporary name
(``O_EXCL``), formatted through its descriptor, made read-only (0444) and renamed
into place while holding the base's lock. Every name is resolved relative to the
``_base`` folder's descriptor (:mod:`cowfleet.safeopen`). An existing base is used
only after it is checked again: not a symlink, a regular file with one link owned
by us or root, and, inspected on that descriptor, raw of exactly its size. A planted
or altered base is refused with an error, never used as a backing file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cowfleet import proc, safeopen
from cowfleet.errors import LocalIOError, UnsafeFileError, UnsafeImageError, ValidationError

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


def _reuse(dir_fd: int, path: Path, size: int) -> LocalBase | None:
    """The existing base at ``path`` after checking it again, or None when there is none.

    Opened through :mod:`cowfleet.safeopen` (no symlink; a regular file with one link,
    ours or root's) and inspected on that descriptor: it must be raw (no other format's
    signature) and exactly ``size`` bytes, as this module makes it. Anything else is
    refused, never used as a backing file.
    """
    from cowfleet.formats.inspector import inspect_fd

    try:
        fd = safeopen.open_existing(dir_fd, path.name, display=path)
    except FileNotFoundError:
        return None
    try:
        inspection = inspect_fd(fd, str(path))
    finally:
        os.close(fd)
    if inspection.format != "raw" or inspection.matches or inspection.virtual_size != size:
        seen = ", ".join(inspection.matches) or inspection.format
        raise UnsafeImageError(
            f"base {path} is not what cowfleet makes (a raw file of {size} bytes): "
            f"found {seen}, {inspection.virtual_size} bytes",
            path=str(path),
        )
    return LocalBase(path=path, format="raw", virtual_size=size, created=False)


def _build(
    dir_fd: int, path: Path, size: int, format_argv: Callable[[str], list[str]], runner: Runner
) -> None:
    """Make the base under a fresh random name (``O_EXCL``), format it through its
    descriptor, and rename it to ``path`` only while that name still is our file."""
    tmp_name = f".{path.name}.tmp.{secrets.token_hex(6)}"
    tmp = path.with_name(tmp_name)
    fd = safeopen.create(dir_fd, tmp_name, display=tmp, mode=0o600)
    try:
        try:
            os.ftruncate(fd, size)  # sparse
        except OSError as exc:
            raise safeopen.io_error(exc, str(tmp), "create") from exc
        # mkfs opens a path: give it one that reaches our descriptor, whatever
        # happens to the name in the folder meanwhile.
        runner(format_argv(safeopen.fd_path(fd)), timeout=300.0)
        try:
            os.fsync(fd)
            os.fchmod(fd, BASE_MODE)
        except OSError as exc:
            raise safeopen.io_error(exc, str(tmp), "finish") from exc
        if not safeopen.same_file(dir_fd, tmp_name, fd):
            raise UnsafeFileError(f"{tmp} was replaced while being formatted", path=str(tmp))
        safeopen.rename(dir_fd, tmp_name, dir_fd, path.name, display=path)
    except BaseException:
        safeopen.unlink_if_same(dir_fd, tmp_name, fd)
        raise
    finally:
        os.close(fd)


def _ensure_base(
    path: Path,
    size: int,
    format_argv: Callable[[str], list[str]],
    *,
    locks_dir: Path,
    lock: LockFactory,
    runner: Runner,
) -> LocalBase:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        locks_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalIOError(f"cannot create {path.parent}: {exc.strerror}") from exc
    with safeopen.opened_dir(path.parent) as dir_fd:
        found = _reuse(dir_fd, path, size)  # fast path: no lock needed to use a base
        if found is not None:
            return found
        with lock(locks_dir, path.name):
            found = _reuse(dir_fd, path, size)
            if found is not None:
                return found
            _build(dir_fd, path, size, format_argv, runner)
            try:
                os.fsync(dir_fd)
            except OSError as exc:
                raise safeopen.io_error(exc, str(path.parent), "sync") from exc
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
        lambda target: mkfs_argv(fs, label, target),
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
        lambda target: ["mkswap", target],
        locks_dir=locks_dir,
        lock=lock,
        runner=runner,
    )
