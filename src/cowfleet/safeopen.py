"""Opening files in folders others could write to, without following planted names.

Every file cowfleet creates or reads in such a folder (``_base``, the image store, an
``image download`` destination) goes through these functions:

- the folder is opened once, ``O_DIRECTORY|O_NOFOLLOW``, and every name is resolved
  relative to that descriptor (``dir_fd``), so swapping a folder on the way changes
  nothing;
- a new file is created ``O_CREAT|O_EXCL|O_NOFOLLOW``: a name already there (a planted
  symlink, hard link or file) is an error, never something written through;
- an existing file is opened ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a planted FIFO
  cannot hang us), then checked on its descriptor: a regular file, no second link,
  owned by us or root. A hard link to a file elsewhere fails the link check; a file someone
  else owns fails the owner check. Callers then read the descriptor they checked,
  never the name again.
- renames and unlinks are relative to folder descriptors too.

Each refusal is an :class:`~cowfleet.errors.UnsafeFileError` naming the path and the
problem; other failures are :class:`~cowfleet.errors.LocalIOError` (or
:class:`~cowfleet.errors.StorageFullError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cowfleet.errors import LocalIOError, StorageFullError, UnsafeFileError

_SAFE = os.O_CLOEXEC | os.O_NOFOLLOW
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _SAFE
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | _SAFE


def _join(dir_display: str | os.PathLike[str], name: str) -> str:
    return os.path.join(os.fspath(dir_display), name)


def io_error(exc: OSError, display: str, doing: str) -> LocalIOError:
    """``exc`` as the error tree's class, naming ``display`` and what was being done."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"no space left {doing} {display}", path=display)
    if exc.errno == errno.ELOOP:
        return UnsafeFileError(f"refusing to follow symlink {display}", path=display)
    return LocalIOError(f"cannot {doing} {display}: {exc.strerror or exc}", path=display)


def open_dir(path: str | os.PathLike[str]) -> int:
    """A descriptor on the folder ``path`` (its last component must not be a symlink)."""
    display = os.fspath(path)
    try:
        return os.open(path, DIR_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            kind = _kind_at(None, display)
            if kind == "symlink":
                raise UnsafeFileError(
                    f"refusing to follow symlink {display}", path=display
                ) from exc
            raise UnsafeFileError(f"{display} is not a folder", path=display) from exc
        raise io_error(exc, display, "open folder") from exc


@contextlib.contextmanager
def opened_dir(path: str | os.PathLike[str]) -> Iterator[int]:
    """:func:`open_dir` as a context manager (the descriptor is closed after)."""
    fd = open_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


def create(
    dir_fd: int,
    name: str,
    *,
    display: str | os.PathLike[str],
    mode: int = 0o644,
    write_flags: int = os.O_RDWR,
) -> int:
    """Create ``name`` in the folder ``dir_fd``; it must not exist in any form."""
    shown = os.fspath(display)
    try:
        return os.open(name, write_flags | CREATE_FLAGS, mode, dir_fd=dir_fd)
    except FileExistsError as exc:
        kind = _kind_at(dir_fd, name)
        what = "a symlink" if kind == "symlink" else "something"
        raise UnsafeFileError(
            f"refusing to create {shown}: {what} is already there", path=shown
        ) from exc
    except OSError as exc:
        raise io_error(exc, shown, "create") from exc


def open_existing(
    dir_fd: int,
    name: str,
    *,
    display: str | os.PathLike[str],
    flags: int = os.O_RDONLY,
    allow_block: bool = False,
) -> int:
    """Open the existing file ``name`` in ``dir_fd`` and check it (see :func:`check`).

    Raises :class:`FileNotFoundError` untranslated when the name does not exist, so a
    caller can create it instead; every other failure is in the error tree.
    """
    shown = os.fspath(display)
    # Look before opening: opening a device or FIFO can have effects of its own.
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise io_error(exc, shown, "open") from exc
    _check_stat(before, shown, allow_block=allow_block)
    try:
        fd = os.open(name, flags | os.O_NONBLOCK | _SAFE, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise io_error(exc, shown, "open") from exc
    try:
        # The descriptor's own check decides (the name may have been replaced since
        # the look above, e.g. by an atomic rename: that is fine when it passes).
        check(fd, shown, allow_block=allow_block)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_path(
    path: str | os.PathLike[str], *, flags: int = os.O_RDONLY, allow_block: bool = False
) -> int:
    """:func:`open_existing` for a full path: its folder first, then the name in it.

    A missing file is a :class:`~cowfleet.errors.LocalIOError` naming it.
    """
    p = Path(path)
    with opened_dir(p.parent) as dir_fd:
        try:
            return open_existing(dir_fd, p.name, display=p, flags=flags, allow_block=allow_block)
        except FileNotFoundError as exc:
            raise LocalIOError(f"cannot open {p}: no such file", path=str(p)) from exc


def check(fd: int, display: str | os.PathLike[str], *, allow_block: bool = False) -> os.stat_result:
    """The file behind ``fd`` is regular, has no second link and is ours (or root's)."""
    shown = os.fspath(display)
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise io_error(exc, shown, "stat") from exc
    _check_stat(st, shown, allow_block=allow_block)
    return st


def _check_stat(st: os.stat_result, shown: str, *, allow_block: bool) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise UnsafeFileError(f"refusing to follow symlink {shown}", path=shown)
    if allow_block and stat.S_ISBLK(mode):
        return
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(
            f"{shown} is not a regular file (it is {_describe(mode)})", path=shown
        )
    if st.st_nlink > 1:  # (0: replaced since we opened it; nobody else can reach it)
        raise UnsafeFileError(
            f"{shown} has {st.st_nlink} links (a hard link to it exists elsewhere)", path=shown
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeFileError(f"{shown} is owned by uid {st.st_uid}, not by us", path=shown)


def _describe(mode: int) -> str:
    for test, word in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return word
    return f"mode {mode:o}"


def _kind_at(dir_fd: int | None, name: str) -> str | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return "symlink" if stat.S_ISLNK(st.st_mode) else _describe(st.st_mode)


def same_file(dir_fd: int, name: str, fd: int) -> bool:
    """Whether ``name`` in ``dir_fd`` still is the file open on ``fd`` (not followed)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mine = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def rename(
    src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, *, display: str | os.PathLike[str]
) -> None:
    """Rename ``src`` to ``dst`` relative to folder descriptors (never follows ``dst``)."""
    try:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    except OSError as exc:
        raise io_error(exc, os.fspath(display), "rename to") from exc


def unlink(dir_fd: int, name: str) -> None:
    """Remove ``name`` from ``dir_fd`` (a missing name is fine; a folder is not touched)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def unlink_if_same(dir_fd: int, name: str, fd: int) -> bool:
    """Remove ``name`` only while it still is the file open on ``fd``; whether it did."""
    if not same_file(dir_fd, name, fd):
        return False
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
        return True
    return False


def fd_path(fd: int) -> str:
    """A name for ``fd`` that a child process can open (``/proc/<our pid>/fd/<fd>``).

    It always reaches the file we hold, whatever happens to its name meanwhile: for
    programs such as ``mkfs`` that only take a path.
    """
    return f"/proc/{os.getpid()}/fd/{fd}"


__all__ = [
    "check",
    "create",
    "fd_path",
    "io_error",
    "open_dir",
    "open_existing",
    "open_path",
    "opened_dir",
    "rename",
    "same_file",
    "unlink",
    "unlink_if_same",
]
