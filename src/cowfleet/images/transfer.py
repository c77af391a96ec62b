"""Downloading an image file to disk: resume by ``Range``, retry with backoff, verify.

:func:`download_to` first checks the destination (a folder, a symlink, a missing
or unwritable folder are refused before any byte is fetched), then streams into
``<dest>.part``, hashing while it writes (the image's ``os_hash_algo``/
``os_hash_value``, else its md5 ``checksum``). After a dropped connection it asks for
the missing bytes only; a server that answers a ranged request with the whole file
(200) is read again from byte 0. An existing ``.part`` from an interrupted run is
re-hashed and continued. Only a complete, verified file is fsynced and renamed to
``dest``; a mismatch raises :class:`IntegrityError`.

Every name is opened through :mod:`cowfleet.safeopen`, relative to the destination
folder's descriptor: a new ``.part`` is created ``O_EXCL``, an old one is reused only
when it is a regular file with one link that we own, and the rename replaces
whatever is at ``dest`` without following it. A failed download removes its
``.part``, except after a connection failure (or Ctrl-C) that left bytes worth
resuming.

Receiving and hashing/writing run in two threads (hashlib and ``write`` release
the GIL on large buffers) joined by a small bounded queue.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cowfleet import safeopen
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    IntegrityError,
    LocalIOError,
    RemoteError,
    StorageFullError,
    TimeoutError_,
    UnsafeFileError,
    UsageError,
)
from cowfleet.images.models import Image

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024
QUEUE_DEPTH = 4
BACKOFF_MAX = 30.0
REHASH_BLOCK = 4 * 1024 * 1024

# (bytes done, total bytes or None)
Progress = Callable[[int, int | None], None]


class StreamLike(Protocol):
    status: int
    offset: int
    total_size: int | None

    def iter_chunks(self, chunk_size: int = ...) -> Iterator[bytes]: ...


OpenDownload = Callable[[int], AbstractContextManager[StreamLike]]


class _ShortBody(BackendUnavailableError):
    """The body ended before the image's size (resumed)."""


@dataclass(frozen=True)
class Expected:
    """What the downloaded bytes must match."""

    size: int | None
    algo: str | None  # hashlib name
    digest: str | None  # hex, lower case

    @classmethod
    def for_image(cls, image: Image) -> Expected:
        algo, value = image.os_hash_algo, image.os_hash_value
        if algo and value:
            if algo.lower() not in hashlib.algorithms_available:
                raise IntegrityError(
                    f"image {image.id}: unsupported os_hash_algo {algo!r}", image_id=image.id
                )
            return cls(image.size, algo.lower(), value.lower())
        if image.checksum:
            return cls(image.size, "md5", image.checksum.lower())
        return cls(image.size, None, None)

    def new_hash(self) -> Any:
        return hashlib.new(self.algo) if self.algo else None


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def check_destination(dest: Path) -> None:
    """Refuse a destination that cannot take the image, before any byte is fetched:
    a folder, a symlink or other non-regular file, a missing or unwritable folder."""
    with safeopen.opened_dir(dest.parent) as dir_fd:
        _check_destination_at(dir_fd, dest)


def _check_destination_at(dir_fd: int, dest: Path) -> None:
    if dest.name in ("", ".", ".."):
        raise UsageError(f"{dest} names a folder: give a file name", path=str(dest))
    try:
        st = os.stat(dest.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise safeopen.io_error(exc, str(dest), "look at") from exc
    else:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{dest} is a folder: give a file name to download to", path=str(dest))
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeFileError(f"refusing to follow symlink {dest}", path=str(dest))
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{dest} is not a regular file", path=str(dest))
    if not os.access(".", os.W_OK, dir_fd=dir_fd):
        raise LocalIOError(f"cannot write to folder {dest.parent}", path=str(dest.parent))


def download_to(
    open_download: OpenDownload,
    image: Image,
    dest: Path,
    *,
    retries: int,
    progress: Progress | None = None,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    chunk_size: int = CHUNK_SIZE,
) -> None:
    """Fetch ``image`` into ``dest`` (see module doc)."""
    dir_fd = safeopen.open_dir(dest.parent)
    try:
        _check_destination_at(dir_fd, dest)
        if image.status != "active":
            raise ConflictError(
                f"image {image.id} is {image.status}, not active: it has no data to download",
                image_id=image.id,
            )
        expected = Expected.for_image(image)
        if expected.algo is None:
            log.warning(
                "image %s: the service gives no checksum; only the size is checked", image.id
            )
        part = part_path(dest)
        fd = _open_part(dir_fd, part)
        try:
            _fetch(
                open_download,
                image,
                expected,
                fd,
                part,
                retries,
                progress,
                backoff,
                sleep,
                chunk_size,
            )
            try:
                os.fsync(fd)
            except OSError as exc:
                raise _local_error(exc, part) from exc
            if not safeopen.same_file(dir_fd, part.name, fd):
                raise UnsafeFileError(f"{part} was replaced during the download", path=str(part))
            safeopen.rename(dir_fd, part.name, dir_fd, dest.name, display=dest)
            try:
                os.fsync(dir_fd)
            except OSError as exc:
                raise _local_error(exc, dest) from exc
        except BaseException as exc:
            if not _worth_resuming(exc, fd):
                safeopen.unlink_if_same(dir_fd, part.name, fd)
            raise
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def _open_part(dir_fd: int, part: Path) -> int:
    """The ``.part`` to write: an earlier run's (checked: a regular file, one link,
    ours) to resume, else a new one (``O_EXCL``: nothing planted is written through)."""
    try:
        return safeopen.open_existing(dir_fd, part.name, display=part, flags=os.O_RDWR)
    except FileNotFoundError:
        pass
    return safeopen.create(dir_fd, part.name, display=part, mode=0o644)


def _worth_resuming(exc: BaseException, fd: int) -> bool:
    """Keep the ``.part`` for a later run only when it holds bytes and the failure was
    the connection's (or an interrupt); a checksum, size or local failure removes it."""
    if not isinstance(exc, (BackendUnavailableError, TimeoutError_, KeyboardInterrupt)):
        return False
    try:
        return os.fstat(fd).st_size > 0
    except OSError:
        return False


def _fetch(
    open_download: OpenDownload,
    image: Image,
    expected: Expected,
    fd: int,
    part: Path,
    retries: int,
    progress: Progress | None,
    backoff: float,
    sleep: Callable[[float], None],
    chunk_size: int,
) -> None:
    st = _State(*_resume_state(fd, part, expected))
    resumed_old_part = st.offset > 0
    failures = 0
    delay = backoff
    while True:
        start = st.offset
        try:
            with open_download(st.offset) as stream:
                if (
                    stream.total_size is not None
                    and expected.size is not None
                    and stream.total_size != expected.size
                ):
                    raise IntegrityError(
                        f"image {image.id}: the service sends {stream.total_size} bytes but "
                        f"the image record says {expected.size}",
                        image_id=image.id,
                    )
                if stream.status == 206:
                    if stream.offset != st.offset:
                        raise RemoteError(
                            f"image {image.id}: asked for bytes from {st.offset}, got a "
                            f"range starting at {stream.offset}",
                            status=206,
                        )
                elif st.offset:
                    log.warning(
                        "image %s: the service ignored the Range request; restarting at 0",
                        image.id,
                    )
                    st.offset = start = 0
                    st.hasher = expected.new_hash()
                    _truncate(fd, part)
                _receive(stream.iter_chunks(chunk_size), fd, part, st, expected, image, progress)
            if expected.size is not None and st.offset < expected.size:
                raise _ShortBody(
                    f"image {image.id}: the body ended at byte {st.offset} of {expected.size}"
                )
        except (BackendUnavailableError, TimeoutError_) as exc:
            if st.offset > start:
                failures, delay = 0, backoff  # progress: the retry budget is per stall
            failures += 1
            if failures > retries:
                if isinstance(exc, _ShortBody):
                    raise IntegrityError(
                        f"{exc} after {retries} retries (truncated download)", image_id=image.id
                    ) from exc
                raise
            log.warning(
                "image %s: download interrupted at byte %d (%s); retry %d/%d in %.1fs",
                image.id,
                st.offset,
                exc,
                failures,
                retries,
                delay,
            )
            sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        actual = st.hasher.hexdigest() if st.hasher is not None else None
        if expected.digest is not None and actual != expected.digest:
            if resumed_old_part:
                # The kept prefix may come from another image or a torn write: start over once.
                log.warning(
                    "image %s: checksum mismatch after resuming an old part file; "
                    "downloading again from byte 0",
                    image.id,
                )
                resumed_old_part = False
                st.hasher, st.offset = expected.new_hash(), 0
                _truncate(fd, part)
                continue
            raise IntegrityError(
                f"image {image.id}: {expected.algo} mismatch: expected {expected.digest}, "
                f"got {actual}",
                image_id=image.id,
            )
        return


def _resume_state(fd: int, part: Path, expected: Expected) -> tuple[Any, int]:
    """Hash what an earlier run left in the part file (or empty it if unusable)."""
    hasher = expected.new_hash()
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise _local_error(exc, part) from exc
    if size == 0:
        return hasher, 0
    if expected.size is None or size > expected.size or hasher is None:
        _truncate(fd, part)
        return hasher, 0
    pos = 0
    try:
        while pos < size:
            block = os.pread(fd, min(REHASH_BLOCK, size - pos), pos)
            if not block:
                break
            hasher.update(block)
            pos += len(block)
    except OSError as exc:
        raise _local_error(exc, part) from exc
    log.info("resuming %s from byte %d", part, pos)
    return hasher, pos


_END = object()


@dataclass
class _State:
    hasher: Any
    offset: int


@dataclass
class _Failed:
    exc: BaseException


def _receive(
    chunks: Iterator[bytes],
    fd: int,
    part: Path,
    st: _State,
    expected: Expected,
    image: Image,
    progress: Progress | None,
) -> None:
    """Write and hash every chunk at ``st.offset``, advancing it (also up to a failure).

    The receiving thread also writes (``pwrite`` releases the GIL) while this thread
    hashes, so hashing and writing overlap. A chunk is queued only once written;
    ``st.offset`` counts chunks written *and* hashed, and the FIFO order means a
    failure is seen only after every chunk before it was hashed.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()

    def reader() -> None:
        pos = st.offset
        try:
            for chunk in chunks:
                if expected.size is not None and pos + len(chunk) > expected.size:
                    raise IntegrityError(
                        f"image {image.id}: the service sent more than the image's "
                        f"{expected.size} bytes",
                        image_id=image.id,
                    )
                if stop.is_set():
                    return
                _pwrite_all(fd, chunk, pos, part)
                pos += len(chunk)
                if not _put_until_stopped(q, chunk, stop):
                    return
            _put_until_stopped(q, _END, stop)
        except BaseException as exc:  # handed to the hashing thread
            _put_until_stopped(q, _Failed(exc), stop)

    thread = threading.Thread(target=reader, name="image-download", daemon=True)
    thread.start()
    done = False
    try:
        while True:
            item = q.get()
            if item is _END:
                done = True
                return
            if isinstance(item, _Failed):
                raise item.exc
            assert isinstance(item, bytes)
            if st.hasher is not None:
                st.hasher.update(item)
            st.offset += len(item)
            if progress is not None:
                progress(st.offset, expected.size)
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a reader waiting on a full queue
                q.get_nowait()
        # On failure the reader may sit in a socket read; closing the response (our
        # caller's ``with``) wakes it, and it stops before writing anything more.
        thread.join(timeout=5 if done else 0.05)


def _put_until_stopped(q: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _pwrite_all(fd: int, data: bytes, offset: int, part: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as exc:
        raise _local_error(exc, part) from exc


def _truncate(fd: int, part: Path) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        raise _local_error(exc, part) from exc


def _local_error(exc: OSError, path: Path) -> LocalIOError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"no space left writing {path}", path=str(path))
    return LocalIOError(f"cannot write {path}: {exc.strerror or exc}", path=str(path))
