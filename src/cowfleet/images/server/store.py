"""Image bytes: a small :class:`Store` protocol and the filesystem implementation.

Files are named by image UUID only (never by a user string). An upload is written to
``staging/<uuid>.<random>.part`` (created ``O_EXCL``), fsynced, and renamed to
``images/<uuid>`` only when every check passed; :meth:`FilesystemStore.clean_staging`
removes leftovers at start. An image's hash tree leaf list (see :mod:`cowfleet.hashtree`)
is kept next to it as ``images/<uuid>.tree`` (:data:`TREE_SUFFIX`): staged the same
way, fsynced and renamed into place just before the image, deleted with it, and spared
by :func:`orphans` while its image is. Every name is resolved relative to a descriptor on its
folder, through :mod:`cowfleet.safeopen`: a stored file is served only when it is no
symlink and a regular file with one link that we (or root) own.

Uploads are written with ``O_DIRECT`` (setting ``images_direct_io``, on by default)
where the filesystem allows it: the bytes go from the upload's buffers to the disk, not
through the page cache. Nothing is cached that nobody asked for yet (a large upload does
not push images that nodes are fetching out of memory), the final fsync has nothing
left to write, and no page-cache memory is filled: on a VM that hands free memory back
to its host that filling cost about 3.2 CPU-s per fresh GiB here, more than either hash.
Downloads bring images into the page cache when they are wanted (see
:mod:`cowfleet.images.server.download`). ``O_DIRECT`` needs aligned buffers, offsets
and lengths: the data goes through one aligned buffer of :data:`DIRECT_BUFFER` bytes
(a copy into memory already in use, about 0.1 CPU-s per GiB), and the last partial
block is padded, written, and cut back with ``ftruncate``.

Without ``O_DIRECT`` (setting off, or a filesystem that refuses it) writes are
buffered and writeback is started every :data:`~cowfleet.fsutil.WRITEBACK_STEP` bytes;
with ``drop_behind`` each window is also dropped from the page cache once written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import stat
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cowfleet import safeopen
from cowfleet.errors import LocalIOError, NotFoundError, StorageFullError, UnsafeFileError
from cowfleet.fsutil import WRITEBACK_STEP, drop_cached, start_writeback

log = logging.getLogger(__name__)

IOV_BATCH = 512  # buffers per writev call (below every IOV_MAX)
# O_DIRECT writes: offsets, lengths and buffer addresses are multiples of this (the
# largest logical block size in use; mmap buffers are page-aligned).
DIRECT_ALIGN = 4096
# The aligned buffer O_DIRECT writes go through (a multiple of DIRECT_ALIGN).
DIRECT_BUFFER = 4 * 1024 * 1024
# The leaf list of an image's hash tree: ``images/<uuid>.tree``.
TREE_SUFFIX = ".tree"


@dataclass
class StagedWrite:
    """An upload being written: an open descriptor on a staging file."""

    image_id: str
    path: Path
    fd: int
    written: int = 0  # bytes accepted by write()
    synced_to: int = 0  # writeback started for bytes before this offset (buffered)
    drop_behind: bool = False
    dropped_to: int = 0  # bytes before this offset were dropped from the page cache
    direct: bool = False  # fd was opened with O_DIRECT
    _aligned: mmap.mmap | None = field(default=None, repr=False)  # O_DIRECT buffer
    _pending: int = 0  # bytes in _aligned not yet written

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write every byte (in order, after what was written before)."""
        if self.direct:
            with self._errors():
                self._write_direct(data)
        else:
            self.write_parts((data,))

    def write_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write the parts in order with as few system calls as possible."""
        if self.direct:
            for part in parts:
                self.write(part)
            return
        with self._errors():
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

    def write_block(self, block: mmap.mmap, n: int) -> None:
        """Write the first ``n`` bytes of ``block`` (page-aligned, as every mmap is):
        with O_DIRECT straight from it when the write is aligned, else as :meth:`write`."""
        with memoryview(block) as whole, whole[:n] as view:
            if self.direct and self._pending == 0 and n % DIRECT_ALIGN == 0:
                with self._errors():
                    self._write_all(view)
                self.written += n
            else:
                self.write(view)

    def _write_direct(self, data: bytes | bytearray | memoryview) -> None:
        if self._aligned is None:
            self._aligned = mmap.mmap(-1, DIRECT_BUFFER)
        buf = self._aligned
        with memoryview(data) as raw, raw.cast("B") as view:
            done = 0
            while done < len(view):
                n = min(len(view) - done, DIRECT_BUFFER - self._pending)
                buf[self._pending : self._pending + n] = view[done : done + n]
                self._pending += n
                self.written += n
                done += n
                if self._pending == DIRECT_BUFFER:
                    self._flush_aligned(DIRECT_BUFFER)

    def _flush_aligned(self, length: int) -> None:
        """Write the first ``length`` (aligned) bytes of the buffer; empties it."""
        assert self._aligned is not None
        with memoryview(self._aligned) as whole, whole[:length] as view:
            self._write_all(view)
        self._pending = 0

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.write(self.fd, rest)

    def finish(self) -> None:
        """Write what is still buffered (O_DIRECT: padded, then cut to size)."""
        if not self.direct or self._pending == 0:
            return
        assert self._aligned is not None
        with self._errors():
            padded = -(-self._pending // DIRECT_ALIGN) * DIRECT_ALIGN
            self._aligned[self._pending : padded] = bytes(padded - self._pending)
            self._flush_aligned(padded)
            os.ftruncate(self.fd, self.written)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
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
        drop_cached(self.fd, self.dropped_to, end - self.dropped_to)
        self.dropped_to = end


class Store(Protocol):
    """Where image bytes live. The API layer only uses this interface."""

    def begin_write(self, image_id: str) -> StagedWrite: ...

    def commit(self, staged: StagedWrite, *, tree_leaves: bytes | None = None) -> None: ...

    def read_tree(self, image_id: str) -> bytes: ...

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

    def __init__(
        self,
        images_dir: Path,
        staging_dir: Path,
        *,
        direct_io: bool = True,
        drop_behind: bool = False,
    ) -> None:
        self.images_dir = images_dir
        self.staging_dir = staging_dir
        self.direct_io = direct_io
        self.drop_behind = drop_behind
        for d in (images_dir, staging_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, image_id: str) -> Path:
        return self.images_dir / _checked_id(image_id)

    def begin_write(self, image_id: str) -> StagedWrite:
        name = f"{_checked_id(image_id)}.{secrets.token_hex(6)}.part"
        path = self.staging_dir / name
        direct = self.direct_io
        with safeopen.opened_dir(self.staging_dir) as dir_fd:
            try:
                fd = safeopen.create(
                    dir_fd,
                    name,
                    display=path,
                    mode=0o600,
                    write_flags=os.O_WRONLY | (os.O_DIRECT if direct else 0),
                )
            except LocalIOError as exc:
                cause = exc.__cause__
                if not direct or not isinstance(cause, OSError) or cause.errno != errno.EINVAL:
                    raise
                # The filesystem refuses O_DIRECT (the file may exist by now: it is ours).
                log.info("%s does not support O_DIRECT; uploads are buffered", self.staging_dir)
                self.direct_io = direct = False
                safeopen.unlink(dir_fd, name)
                fd = safeopen.create(
                    dir_fd, name, display=path, mode=0o600, write_flags=os.O_WRONLY
                )
        return StagedWrite(image_id, path, fd, drop_behind=self.drop_behind, direct=direct)

    def commit(self, staged: StagedWrite, *, tree_leaves: bytes | None = None) -> None:
        """fsync the staged file and rename it into place (then fsync the directory).

        ``tree_leaves`` (the hash tree's leaf list) is written, fsynced and renamed to
        ``<uuid>.tree`` first, so an image in place always has its leaf list beside it."""
        tree_put = False
        try:
            staged.finish()
            if tree_leaves is not None:
                self._put_tree(staged, tree_leaves)
                tree_put = True
            try:
                os.fsync(staged.fd)
                if staged.drop_behind:
                    staged.drop_cache()  # all clean now
                os.close(staged.fd)
                staged.fd = -1
                with (
                    safeopen.opened_dir(self.staging_dir) as src_fd,
                    safeopen.opened_dir(self.images_dir) as dst_fd,
                ):
                    os.rename(
                        staged.path.name,
                        _checked_id(staged.image_id),
                        src_dir_fd=src_fd,
                        dst_dir_fd=dst_fd,
                    )
                    os.fsync(dst_fd)
            except OSError as exc:
                raise LocalIOError(f"cannot store image {staged.image_id}: {exc.strerror}") from exc
        except BaseException:
            self.abort(staged)
            if tree_put:
                with contextlib.suppress(LocalIOError), safeopen.opened_dir(self.images_dir) as d:
                    safeopen.unlink(d, _checked_id(staged.image_id) + TREE_SUFFIX)
            raise

    def _put_tree(self, staged: StagedWrite, leaves: bytes) -> None:
        name = _checked_id(staged.image_id) + TREE_SUFFIX
        part = staged.path.name + TREE_SUFFIX
        shown = self.staging_dir / part
        with (
            safeopen.opened_dir(self.staging_dir) as src_fd,
            safeopen.opened_dir(self.images_dir) as dst_fd,
        ):
            fd = safeopen.create(src_fd, part, display=shown, mode=0o600, write_flags=os.O_WRONLY)
            try:
                try:
                    view = memoryview(leaves)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                safeopen.unlink(src_fd, part)
                raise safeopen.io_error(exc, str(shown), "write") from exc
            except BaseException:
                safeopen.unlink(src_fd, part)
                raise
            safeopen.rename(src_fd, part, dst_fd, name, display=self.images_dir / name)

    def abort(self, staged: StagedWrite) -> None:
        if staged.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(staged.fd)
            staged.fd = -1
        with contextlib.suppress(LocalIOError), safeopen.opened_dir(self.staging_dir) as dir_fd:
            safeopen.unlink(dir_fd, staged.path.name)

    def open_read(self, image_id: str) -> int:
        """A descriptor on the stored file, opened relative to the store folder's
        descriptor and checked (no symlink; a regular file with one link, ours)."""
        name = _checked_id(image_id)
        with safeopen.opened_dir(self.images_dir) as dir_fd:
            try:
                return safeopen.open_existing(dir_fd, name, display=self.images_dir / name)
            except FileNotFoundError as exc:
                raise NotFoundError(f"no data stored for image {image_id}") from exc
            except UnsafeFileError as exc:
                # The log names the path and the problem; the client learns neither.
                log.error("image %s: %s", image_id, exc)
                raise LocalIOError(
                    f"the stored file of image {image_id} was refused (see the server log)"
                ) from exc

    def read_tree(self, image_id: str) -> bytes:
        """The stored hash tree leaf list of an image (NotFoundError when it has none)."""
        name = _checked_id(image_id) + TREE_SUFFIX
        with safeopen.opened_dir(self.images_dir) as dir_fd:
            try:
                fd = safeopen.open_existing(dir_fd, name, display=self.images_dir / name)
            except FileNotFoundError as exc:
                raise NotFoundError(
                    f"image {image_id} has no hash tree", image_id=image_id
                ) from exc
            except UnsafeFileError as exc:
                log.error("image %s: %s", image_id, exc)
                raise LocalIOError(
                    f"the stored hash tree of image {image_id} was refused (see the server log)"
                ) from exc
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as exc:
            raise safeopen.io_error(exc, str(self.images_dir / name), "read") from exc
        finally:
            os.close(fd)

    def delete(self, image_id: str) -> None:
        # An open descriptor (a download in flight) keeps reading the unlinked file.
        name = _checked_id(image_id)
        with safeopen.opened_dir(self.images_dir) as dir_fd:
            safeopen.unlink(dir_fd, name)
            safeopen.unlink(dir_fd, name + TREE_SUFFIX)

    def size(self, image_id: str) -> int:
        fd = self.open_read(image_id)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

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

    def reconcile(
        self, keep: Collection[str], *, grace: float, now: float | None = None
    ) -> list[str]:
        """At start: remove each file under ``images/`` that no id in ``keep`` (the
        active images) explains and that was last written more than ``grace`` seconds
        ago (a kill between the catalog delete and the file delete leaves one; the grace
        spares a file another process has just renamed into place). Returns the names
        removed; each is logged. Folders are left alone (and logged)."""
        entries: list[tuple[str, float]] = []
        for entry in os.scandir(self.images_dir):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                log.warning("unexpected folder in the image store left alone: %s", entry.path)
                continue
            entries.append((entry.name, st.st_mtime))
        doomed = orphans(entries, keep, grace=grace, now=time.time() if now is None else now)
        for name in doomed:
            path = self.images_dir / name
            try:
                size = path.lstat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove orphan store file %s: %s", path, exc.strerror)
                continue
            log.warning("removed %s (%d bytes): no active image has this id", path, size)
        return doomed


def orphans(
    entries: Iterable[tuple[str, float]], keep: Collection[str], *, grace: float, now: float
) -> list[str]:
    """The plan of :meth:`FilesystemStore.reconcile`: the names (with their mtimes) in
    ``entries`` that are not in ``keep`` (nor the leaf list ``<id>.tree`` of an id in
    ``keep``) and older than ``grace`` seconds at ``now``."""

    def kept(name: str) -> bool:
        return name in keep or (name.endswith(TREE_SUFFIX) and name[: -len(TREE_SUFFIX)] in keep)

    return sorted(name for name, mtime in entries if not kept(name) and now - mtime > grace)
