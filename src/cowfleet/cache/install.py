"""Turning a verified ``.part`` into a base: policy, table check, conversion, rename.

Runs under the base lock after the fetch engine has verified the bytes. The safety
policy judges the streaming inspection; a qcow2's tables are then checked on the whole
file; with ``force_raw`` the image is converted (:mod:`cowfleet.cache.convert`). The
metadata is written before the rename, so a base never exists without its record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cowfleet.cache import metadata as md
from cowfleet.cache.basesink import unlink_at
from cowfleet.cache.layout import BasePaths
from cowfleet.errors import LocalIOError
from cowfleet.formats.inspection import GLANCE_DISK_FORMATS, Inspection, qemu_format_name

if TYPE_CHECKING:
    from cowfleet.images.models import Image


@dataclass(frozen=True)
class Installed:
    path: os.PathLike[str]
    format: str  # qemu-img format name of the file in _base
    virtual_size: int
    size: int


def check(
    dir_fd: int,
    paths: BasePaths,
    image_id: str,
    disk_format: str,
    inspection: Inspection,
    *,
    max_virtual_size: int,
) -> None:
    """The safety policy on the stream's inspection, then a qcow2's tables on disk."""
    from cowfleet.formats import policy

    verdict = policy.check(disk_format, inspection, max_virtual_size=max_virtual_size)
    verdict.raise_if_unsafe(image_id=image_id)
    if inspection.format == "qcow2":
        from cowfleet.formats.qcow2_tables import check_file

        # The stream judged the header; the tables' entries need the whole file.
        check_file(paths.part.name, dir_fd=dir_fd, image_id=image_id)


def install(
    dir_fd: int,
    paths: BasePaths,
    image: Image,
    *,
    disk_format: str,
    digest: tuple[str, str],
    inspection: Inspection,
    force_raw: bool,
    max_virtual_size: int,
    source: str,
    now: float,
) -> Installed:
    """Write the base's metadata and rename the ``.part`` (or its raw conversion) into place."""
    algo, value = digest
    file_format = GLANCE_DISK_FORMATS[disk_format]
    src_name = paths.part.name
    file_algo, file_value = algo, value
    converted_from: str | None = None
    virtual_size = inspection.virtual_size
    if force_raw and file_format != "raw":
        from cowfleet.cache.convert import to_raw

        conv = to_raw(paths, dir_fd, file_format, max_virtual_size, image.id)
        src_name = paths.converted.name
        converted_from, file_format = file_format, "raw"
        file_algo, file_value = "sha512", conv.sha512
        virtual_size = conv.virtual_size
    file_size = os.stat(src_name, dir_fd=dir_fd, follow_symlinks=False).st_size
    props = image.properties or {}
    meta = md.BaseMeta(
        image_id=image.id,
        name=image.name,
        disk_format=disk_format,
        file_format=file_format,
        image_size=image.size or 0,
        file_size=file_size,
        virtual_size=virtual_size,
        hash_algo=algo,
        hash_value=value,
        file_hash_algo=file_algo,
        file_hash_value=file_value,
        fetched_at=now,
        source=source,
        verified_at=now,
        converted_from=converted_from,
        kernel_id=props.get("kernel_id"),
        ramdisk_id=props.get("ramdisk_id"),
    )
    md.write_meta(paths.meta, meta)
    try:
        os.rename(src_name, paths.base.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise LocalIOError(f"cannot install {paths.base}: {exc.strerror}") from exc
    if converted_from:
        unlink_at(dir_fd, paths.part.name)
    md.remove_quietly(paths.part_meta)
    return Installed(paths.base, qemu_format_name(file_format), virtual_size, file_size)


def discard(dir_fd: int, paths: BasePaths) -> None:
    """Remove what a refused fetch left (its ``.part``, a conversion, the part record)."""
    for name in (paths.part.name, paths.converted.name):
        unlink_at(dir_fd, name)
    md.remove_quietly(paths.part_meta)
