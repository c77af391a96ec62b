"""Image bytes: a small :class:`Store` protocol and the filesystem implementation.

Files are named by image UUID only (never by a user string). An upload is written to
``staging/<uuid>.<random>.part``, fsynced, and renamed to ``images/<uuid>`` only when
every check passed; :meth:`FilesystemStore.clean_staging` removes leftovers at start.

With ``drop_behind`` (setting ``images_drop_upload_cache``, off by default) an upload
does not stay in the page cache: writeback is started every
:data:`~cowfleet.fsutil.WRITEBACK_STEP` bytes and the window before is dropped once
written (``POSIX_FADV_DONTNEED``), so its pages are reused for the next blocks; the
download path then drops what it sent too (:mod:`cowfleet.images.server.download`). On
a VM whose free memory is handed back to the host, filling fresh page-cache memory
costs about 2.5 CPU-s per GiB (0.4 with recycled pages). The price: every download
reads from disk (1.5-1.7 GB/s here against 2.3-2.9 from the page cache), hence off by
default.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cowfleet.errors import LocalIOError, NotFoundError, StorageFullError
from cowfleet.fsutil import WRITEBACK_STEP, fsync_dir, start_writeback

log = logging.getLogger(__name__)

IOV_BATCH = 512  # buffers per writev call (below every IOV_MAX)
_DONTNEED = os.POSIX_FADV_DONTNEED


@dataclass
class StagedWrite:
    """An upload being written: an open descriptor on a staging file."""

    image_id: str
    path: Path
    fd: int
    written: int = 0
    synced_to: int = 0  # writeback started for bytes before this offset
    drop_behind: bool = False
    dropped_to: int = 0  # bytes before this offset were dropped from the page cache

    def write(self, data: bytes | memoryview) -> None:
        """Write every byte (``os.write`` may write less than asked)."""
        self.write_parts((data,))

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write the parts in order with as few system calls as possible (``writev``)."""
        try:
            todo = [memoryview(p) for p in parts if len(p)]
            while todo:
                n = os.writev(self.fd, todo[:IOV_BATCH])
                self.written += n
                while todo and n >= len(todo[0]):
                    n -= len(todo[0])
                    todo.pop(0)
                if n:
                    todo[0] = todo[0][n:]
            if self.written - self.synced_to >= WRITEBACK_STEP:
                start_writeback(self.fd, self.synced_to, self.written - self.synced_to)
                # Drop what started writeback a whole step ago (pages still being
                # written are skipped by the kernel and simply stay cached).
                if self.drop_behind and self.synced_to - WRITEBACK_STEP > self.dropped_to:
                    self.drop_cache(self.synced_to - WRITEBACK_STEP)
                self.synced_to = self.written
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(
                    f"no space left while storing image {self.image_id}", path=str(self.path)
                ) from exc
            raise LocalIOError(
                f"cannot write image {self.image_id}: {exc.strerror}", path=str(self.path)
            ) from exc

    def drop_cache(self, end: int | None = None) -> None:
        """Advise the kernel to drop the clean cached pages in ``[dropped_to, end)``."""
        end = self.written if end is None else end
        with contextlib.suppress(OSError):  # advisory
            os.posix_fadvise(self.fd, self.dropped_to, end - self.dropped_to, _DONTNEED)
        self.dropped_to = end


class Store(Protocol):
    """Where image bytes live. The API layer only uses this interface."""

    def begin_write(self, image_id: str) -> StagedWrite: ...

    def commit(self, staged: StagedWrite) -> None: ...

    def abort(self, staged: StagedWrite) -> None: ...

    def open_read(self, image_id: str) -> int: ...

    def delete(self, image_id: str) -> None: ...

    def size(self, image_id: str) -> int: ...


def _checked_id(image_id: str) -> str:
    # Names on disk come from canonical UUIDs only.
    canonical = str(uuid.UUID(image_id))
    if canonical != image_id:
        raise ValueError(f"not a canonical image id: {image_id!r}")
    return canonical


class FilesystemStore:
    """Image files under ``images/``, uploads staged under ``staging/``."""

    def __init__(self, images_dir: Path, staging_dir: Path, *, drop_behind: bool = False) -> None:
        self.images_dir = images_dir
        self.staging_dir = staging_dir
        self.drop_behind = drop_behind
        for d in (images_dir, staging_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, image_id: str) -> Path:
        return self.images_dir / _checked_id(image_id)

    def begin_write(self, image_id: str) -> StagedWrite:
        name = f"{_checked_id(image_id)}.{secrets.token_hex(6)}.part"
        path = self.staging_dir / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LocalIOError(f"cannot create staging file {path}: {exc.strerror}") from exc
        return StagedWrite(image_id, path, fd, drop_behind=self.drop_behind)

    def commit(self, staged: StagedWrite) -> None:
        """fsync the staged file and rename it into place (then fsync the directory)."""
        try:
            os.fsync(staged.fd)
            if staged.drop_behind:
                staged.drop_cache()  # all clean now
            os.close(staged.fd)
            staged.fd = -1
            os.rename(staged.path, self.path(staged.image_id))
            fsync_dir(self.images_dir)
        except OSError as exc:
            self.abort(staged)
            raise LocalIOError(f"cannot store image {staged.image_id}: {exc.strerror}") from exc

    def abort(self, staged: StagedWrite) -> None:
        if staged.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(staged.fd)
            staged.fd = -1
        with contextlib.suppress(FileNotFoundError):
            staged.path.unlink()

    def open_read(self, image_id: str) -> int:
        try:
            return os.open(self.path(image_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFoundError(f"no data stored for image {image_id}") from exc
        except OSError as exc:
            raise LocalIOError(f"cannot open image {image_id}: {exc.strerror}") from exc

    def delete(self, image_id: str) -> None:
        # An open descriptor (a download in flight) keeps reading the unlinked file.
        with contextlib.suppress(FileNotFoundError):
            self.path(image_id).unlink()

    def size(self, image_id: str) -> int:
        try:
            return self.path(image_id).stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"no data stored for image {image_id}") from exc

    def clean_staging(self) -> int:
        """Remove every staging leftover (from a crash); returns how many."""
        removed = 0
        for entry in self.staging_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
        if removed:
            log.warning("removed %d staging leftover(s) from %s", removed, self.staging_dir)
        return removed
