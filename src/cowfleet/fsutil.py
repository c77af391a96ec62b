"""Small filesystem helpers shared by every part that writes durably."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create in ``path`` durable (fsync of the directory itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Ask the kernel to start writing a big file back every this many bytes, so the fsync
# at the end has little left to do (an early, asynchronous start; it does not wait).
WRITEBACK_STEP = 32 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
# cachestat(2) (Linux 6.5): the same number on every architecture.
_NR_CACHESTAT = 451
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _libc() -> Any:
    """libc through ctypes, or None. Looked up (and ctypes imported) on first use, so
    that importing this module stays cheap for short-lived commands."""
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except (ImportError, OSError):
        return None


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes

    func = getattr(_libc(), "sync_file_range", None)
    if func is None:
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` where libc has it.

    Advisory only: errors are ignored and, without the call, nothing happens.
    """
    func = _sync_file_range()
    if func is not None:
        func(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _cachestat() -> Callable[[int, int, int], int | None] | None:
    """``cachestat(fd, offset, length) -> cached pages`` (None on failure), or None
    where libc has no ``syscall``."""
    import ctypes

    syscall = getattr(_libc(), "syscall", None)
    if syscall is None:
        return None

    class Range(ctypes.Structure):
        _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))

    class Stat(ctypes.Structure):
        _fields_ = (
            ("nr_cache", ctypes.c_uint64),
            ("nr_dirty", ctypes.c_uint64),
            ("nr_writeback", ctypes.c_uint64),
            ("nr_evicted", ctypes.c_uint64),
            ("nr_recently_evicted", ctypes.c_uint64),
        )

    def cachestat(fd: int, offset: int, length: int) -> int | None:
        stat = Stat()
        rng = Range(offset, length)
        if syscall(_NR_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) == 0:
            return int(stat.nr_cache)
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # old kernel, or seccomp
            global _cachestat_missing
            _cachestat_missing = True
        return None

    return cachestat


_cachestat_missing = False  # set once cachestat(2) answered ENOSYS or EPERM


def cached_fraction(fd: int, offset: int, length: int) -> float | None:
    """About how much of ``[offset, offset + length)`` is in the page cache (0.0-1.0).

    Exact with ``cachestat(2)`` (Linux 6.5 and later); on older kernels a non-blocking
    read of the range's first byte answers 0.0 or 1.0 for the whole range. None when
    neither works (the caller then knows nothing).
    """
    if length <= 0:
        return 1.0
    cachestat = None if _cachestat_missing else _cachestat()
    if cachestat is not None:
        pages = cachestat(fd, offset, length)
        if pages is not None:
            return min(1.0, pages * _PAGE_SIZE / length)
        if not _cachestat_missing:
            return None
    try:
        os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0.0
    except (OSError, AttributeError):
        return None
    return 1.0


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Advise the kernel to drop the clean cached pages of a range (errors ignored)."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
