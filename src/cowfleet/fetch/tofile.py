"""The user's-file sink: ``cowfleet image download`` into ``--file``.

:func:`check_destination` refuses a destination that cannot take the image (a folder,
a symlink or other non-regular file, a missing or unwritable folder) before any byte
is fetched. :func:`download_to` then fetches into ``<dest>.part`` through the engine
(:func:`cowfleet.fetch.engine.fetch`): an existing ``.part`` from an interrupted run is
re-verified and continued. Only a complete, verified file is fsynced and renamed to
``dest``.

Every name is opened through :mod:`cowfleet.safeopen`, relative to the destination
folder's descriptor: a new ``.part`` is created ``O_EXCL``, an old one is reused only
when it is a regular file with one link that we own, and the rename replaces whatever
is at ``dest`` without following it. A failed download removes its ``.part``, except
after a connection failure (or Ctrl-C) that left bytes worth resuming.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cowfleet import safeopen
from cowfleet.digest import image_digest, verifier_for
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    LocalIOError,
    TimeoutError_,
    UnsafeFileError,
    UsageError,
)
from cowfleet.fetch.engine import Fetched, OpenStream, Progress, Want, fetch
from cowfleet.fetch.partsink import PartSink
from cowfleet.fetch.retry import Budget
from cowfleet.hashtree import Tree
from cowfleet.images.models import Image

log = logging.getLogger(__name__)


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
    open_stream: OpenStream,
    image: Image,
    dest: Path,
    budget: Budget,
    *,
    tree: Tree | None = None,
    progress: Progress | None = None,
) -> Fetched:
    """Fetch ``image`` into ``dest`` (see the module doc), verified with ``tree`` when
    given (the image's hash tree), else its digest."""
    dir_fd = safeopen.open_dir(dest.parent)
    try:
        _check_destination_at(dir_fd, dest)
        if image.status != "active":
            raise ConflictError(
                f"image {image.id} is {image.status}, not active: it has no data to download",
                image_id=image.id,
            )
        digest = image_digest(image.os_hash_algo, image.os_hash_value, image.checksum)
        if digest is None and tree is None:
            log.warning(
                "image %s: the service gives no checksum; only the size is checked", image.id
            )
        want = Want(image.id, image.size, verifier_for(image.id, digest, tree))
        part = part_path(dest)
        sink = PartSink(_open_part(dir_fd, part), str(part))
        try:
            done = fetch(open_stream, sink, want, budget, progress=progress)
            if not safeopen.same_file(dir_fd, part.name, sink.fd):
                raise UnsafeFileError(f"{part} was replaced during the download", path=str(part))
            safeopen.rename(dir_fd, part.name, dir_fd, dest.name, display=dest)
            try:
                os.fsync(dir_fd)
            except OSError as exc:
                raise safeopen.io_error(exc, str(dest), "sync the folder of") from exc
            return done
        except BaseException as exc:
            if not _worth_resuming(exc, sink.fd):
                safeopen.unlink_if_same(dir_fd, part.name, sink.fd)
            raise
        finally:
            sink.close()
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
