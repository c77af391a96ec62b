"""The streaming sink: one pass that hashes, inspects and writes a sparse ``.part``.

Sans-network: the sink is fed chunks (``feed``) by whoever reads the image
service (see :mod:`cowfleet.cache.fetch`). It

- refuses any byte past the declared image size (:class:`IntegrityError`);
- hashes every byte (the image's ``os_hash_algo``, usually sha512, else md5);
- feeds the format inspector (which stops looking once it has what it needs);
- writes to a ``.part`` file it created with ``O_CREAT|O_EXCL|O_NOFOLLOW``
  relative to the directory fd (:mod:`cowfleet.safeopen`), leaving holes for
  all-zero 64 KiB blocks;
- on :meth:`finish`, checks length and digest, truncates to the full size (so
  trailing zeros stay holes) and fsyncs.

A resumed sink re-reads the prefix already on disk (re-hashing and
re-inspecting it) and continues from there; see docs/cache.md for why the
prefix is re-hashed rather than the hash state persisted.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from cowfleet import safeopen
from cowfleet.errors import IntegrityError, LocalIOError, StorageFullError
from cowfleet.formats.inspection import Inspection
from cowfleet.fsutil import WRITEBACK_STEP, start_writeback

log = logging.getLogger(__name__)

BLOCK = 64 * 1024  # hole granularity
READBACK = 4 * 1024 * 1024  # prefix re-read size
_ZERO_BLOCK = bytes(BLOCK)
ALLOWED_HASHES = ("sha512", "sha384", "sha256", "sha3_512", "sha3_256", "md5", "sha1")


class InspectorLike(Protocol):
    def feed(self, chunk: bytes | memoryview) -> None: ...

    def finish(self, total_size: int | None = None) -> Inspection: ...


def new_hasher(algo: str) -> hashlib._Hash:
    name = algo.lower().replace("-", "_")
    if name not in ALLOWED_HASHES:
        raise IntegrityError(f"unsupported hash algorithm {algo!r}", hash_algo=algo)
    return hashlib.new(name)


def _oserror(exc: OSError, what: str, path: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"no space left on device while {what} {path}", path=path)
    if exc.errno == errno.ELOOP:
        return LocalIOError(f"{path} is a symlink; refusing to follow it", path=path)
    return LocalIOError(f"error while {what} {path}: {exc.strerror}", path=path)


class PartFile:
    """A ``.part`` file opened safely relative to a directory fd.

    Writes are positional (``pwrite``); all-zero blocks are skipped, leaving
    holes. ``position`` is the logical end of what was fed.
    """

    def __init__(self, fd: int, name: str, display: str, position: int) -> None:
        self.fd = fd
        self.name = name
        self.display = display
        self.position = position
        self.writeback_from = position  # writeback started for bytes before this offset

    @classmethod
    def create(cls, dir_fd: int, name: str, display: str) -> PartFile:
        fd = safeopen.create(dir_fd, name, display=display, mode=0o644, write_flags=os.O_WRONLY)
        return cls(fd, name, display, 0)

    @classmethod
    def reopen(cls, dir_fd: int, name: str, display: str) -> PartFile:
        """Open an existing ``.part`` for resuming; it must be a plain file of ours
        (see :func:`cowfleet.safeopen.open_existing`)."""
        try:
            fd = safeopen.open_existing(dir_fd, name, display=display, flags=os.O_RDWR)
        except FileNotFoundError as exc:
            raise _oserror(exc, "reopening", display) from exc
        return cls(fd, name, display, os.fstat(fd).st_size)

    def write(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        pos = self.position
        try:
            start = -1
            mv = memoryview(chunk)
            for i in range(0, n, BLOCK):
                j = min(i + BLOCK, n)
                zero = (
                    chunk[i] == 0
                    and chunk[j - 1] == 0
                    and chunk[(i + j) >> 1] == 0
                    and bytes(chunk[i:j]) == _ZERO_BLOCK[: j - i]
                )
                if zero:
                    if start >= 0:
                        self._pwrite(mv[start:i], pos + start)
                        start = -1
                elif start < 0:
                    start = i
            if start >= 0:
                self._pwrite(mv[start:n], pos + start)
        except OSError as exc:
            raise _oserror(exc, "writing", self.display) from exc
        self.position = pos + n
        if self.position - self.writeback_from >= WRITEBACK_STEP:
            start_writeback(self.fd, self.writeback_from, self.position - self.writeback_from)
            self.writeback_from = self.position

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done

    def size_on_disk(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _oserror(exc, "truncating", self.display) from exc
        self.position = size

    def sync(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as exc:
            raise _oserror(exc, "syncing", self.display) from exc

    def read_prefix(self, upto: int) -> Callable[[], bytes]:
        """A reader of the first ``upto`` bytes, READBACK at a time."""
        offset = 0

        def read() -> bytes:
            nonlocal offset
            if offset >= upto:
                return b""
            data = os.pread(self.fd, min(READBACK, upto - offset), offset)
            offset += len(data)
            return data

        return read

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AsyncWriter:
    """Writes chunks to a :class:`PartFile` in a thread, in order.

    Hashing (in the caller's thread) and writing (here) both release the GIL, so
    with two cores they overlap. At most ``depth`` chunks wait; an error is
    raised at the next :meth:`submit` or at :meth:`flush`.
    """

    def __init__(
        self,
        part: PartFile,
        depth: int = 4,
        release: Callable[[bytes | memoryview], None] | None = None,
    ) -> None:
        self.part = part
        self.release = release  # hands a chunk's buffer back for reuse once written
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            chunk = self._q.get()
            try:
                if chunk is None:
                    return
                if self._error is None:
                    self.part.write(chunk)
                    if self.release is not None:
                        self.release(chunk)
            except BaseException as exc:  # handed to the caller
                self._error = exc
            finally:
                self._q.task_done()

    def submit(self, chunk: bytes | memoryview) -> None:
        if self._error is not None:
            self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cowfleet-fetch-wr", daemon=True)
            self._thread.start()
        self._q.put(chunk)

    def flush(self) -> None:
        """Wait until every submitted chunk is written; raise a write error."""
        if self._thread is not None:
            self._q.join()
        if self._error is not None:
            self._raise()

    def _raise(self) -> None:
        exc, self._error = self._error, None
        assert exc is not None
        raise exc

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None


class StreamSink:
    """Hash + inspect + sparse-write, refusing bytes past ``expected_size``."""

    def __init__(
        self,
        part: PartFile,
        *,
        image_id: str,
        expected_size: int,
        hash_algo: str,
        hash_value: str,
        inspector_factory: Callable[[], InspectorLike],
        release: Callable[[bytes | memoryview], None] | None = None,
    ) -> None:
        self.part = part
        self.image_id = image_id
        self.expected_size = expected_size
        self.hash_algo = hash_algo
        self.hash_value = hash_value.lower()
        self._factory = inspector_factory
        self.hasher = new_hasher(hash_algo)
        self.inspector = inspector_factory()
        self.received = 0
        self.resumed_from = 0
        self.writer = AsyncWriter(part, release=release)

    @property
    def offset(self) -> int:
        return self.received

    def absorb_prefix(self) -> int:
        """Re-read what a previous attempt left on disk; returns its length."""
        on_disk = self.part.size_on_disk()
        if on_disk > self.expected_size:
            log.warning("%s is longer than the image; starting over", self.part.display)
            self.part.truncate(0)
            return 0
        read = self.part.read_prefix(on_disk)
        while True:
            data = read()
            if not data:
                break
            self.hasher.update(data)
            self.inspector.feed(data)
            self.received += len(data)
        self.part.position = self.received
        self.resumed_from = self.received
        return self.received

    def restart(self) -> None:
        """Start again from byte 0 (the server ignored our Range request)."""
        self.writer.flush()
        self.part.truncate(0)
        self.hasher = new_hasher(self.hash_algo)
        self.inspector = self._factory()
        self.received = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        if self.received + n > self.expected_size:
            raise IntegrityError(
                f"image {self.image_id}: the service sent more than the declared "
                f"{self.expected_size} bytes",
                image_id=self.image_id,
                expected=self.expected_size,
            )
        self.hasher.update(chunk)
        self.inspector.feed(chunk)  # cheap once its regions are captured (keeps the tail)
        # The writer is the chunk's last user: it may hand the buffer back for reuse.
        self.writer.submit(chunk)
        self.received += n

    def close(self) -> None:
        """Stop the writer thread (after :meth:`finish` or on failure)."""
        try:
            self.writer.flush()
        except BaseException:
            pass
        finally:
            self.writer.close()

    def is_complete(self) -> bool:
        return self.received == self.expected_size

    def finish(self) -> Inspection:
        """Check length and digest, make the file durable, return the inspection."""
        self.writer.flush()
        if self.received != self.expected_size:
            raise IntegrityError(
                f"image {self.image_id}: truncated download, got {self.received} of "
                f"{self.expected_size} bytes",
                image_id=self.image_id,
            )
        digest = self.hasher.hexdigest()
        if not hmac.compare_digest(digest, self.hash_value):
            raise IntegrityError(
                f"image {self.image_id}: {self.hash_algo} mismatch: expected "
                f"{self.hash_value[:16]}..., got {digest[:16]}...",
                image_id=self.image_id,
                expected=self.hash_value,
                actual=digest,
            )
        self.part.sync(self.expected_size)
        return self.inspector.finish(self.expected_size)
