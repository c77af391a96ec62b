"""Instance disks: qcow2 overlays written straight into the temporary instance folder.

The whole folder is renamed into place once complete, so each overlay needs no
temporary name of its own (``formats.overlay.create_overlay`` makes one per file,
for callers writing into a live directory). The qcow2 metadata comes from the same
writer (:func:`cowfleet.formats.overlay.build_metadata`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from cowfleet.errors import LocalIOError, StorageFullError, ValidationError
from cowfleet.formats import overlay, policy
from cowfleet.formats.inspector import inspect_path

MAX_BACKING_NAME = 1023  # qcow2.txt: a backing file name is at most 1023 bytes


def _qemu_format(fmt: str) -> str:
    fmt = {"vhd": "vpc"}.get(fmt, fmt)
    if fmt not in overlay.BACKING_FORMATS:
        known = ", ".join(sorted(overlay.BACKING_FORMATS))
        raise ValidationError(f"unknown backing format {fmt!r} (expected one of {known})")
    return fmt


def reinspect_base(path: Path, fmt: str, *, max_virtual_size: int) -> int:
    """Inspect a cached base again (head reads + the safety policy); its virtual size.

    Raises :class:`UnsafeImageError` when the file no longer is what the cache verified.
    """
    qfmt = _qemu_format(fmt)
    inspection = inspect_path(path)
    verdict = policy.check(
        overlay.BACKING_FORMATS[qfmt], inspection, max_virtual_size=max_virtual_size
    )
    verdict.raise_if_unsafe(path=str(path))
    return int(inspection.virtual_size)


def write_overlay(
    out: Path,
    backing: Path,
    backing_format: str,
    size: int,
    *,
    backing_virtual_size: int,
    mode: int = 0o600,
    cluster_size: int = overlay.DEFAULT_CLUSTER_SIZE,
) -> int:
    """Write a new qcow2 v3 overlay ``out`` (must not exist) on ``backing``; its size.

    ``size`` is rounded up to 512 bytes and must cover the backing file's virtual size.
    No fsync here: the caller syncs the whole folder before renaming it into place.
    """
    qfmt = _qemu_format(backing_format)
    if not backing.is_absolute():
        raise ValidationError(f"backing file must be an absolute path: {backing}")
    name = os.fsencode(str(backing))
    if len(name) > MAX_BACKING_NAME:
        raise ValidationError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    size = -(-size // overlay.SECTOR) * overlay.SECTOR
    if size < backing_virtual_size:
        raise ValidationError(
            f"disk size {size} is smaller than its base's virtual size {backing_virtual_size}"
        )
    layout = overlay.plan_layout(size, cluster_size)
    pieces = overlay.build_metadata(layout, name, qfmt.encode(), lazy_refcounts=False)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(out, flags, mode)
        try:
            overlay.write_pieces(fd, pieces, layout.file_size)  # the zero tables stay holes
        finally:
            os.close(fd)
    except OSError as exc:
        cls = StorageFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else LocalIOError
        raise cls(f"cannot write {out}: {exc.strerror}", path=str(out)) from exc
    return size
