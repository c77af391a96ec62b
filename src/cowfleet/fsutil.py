"""Small filesystem helpers shared by every part that writes durably."""

from __future__ import annotations

import os
from collections.abc import Callable


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
_sync_file_range: Callable[[int, int, int, int], int] | None = None
_looked_up = False


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` where libc has it.

    Advisory only: errors are ignored and, without the call, nothing happens. libc is
    looked up on first use so that importing this module stays cheap.
    """
    global _sync_file_range, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            func = libc.sync_file_range
            func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            func.restype = ctypes.c_int
            _sync_file_range = func
        except (OSError, AttributeError):
            _sync_file_range = None
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
