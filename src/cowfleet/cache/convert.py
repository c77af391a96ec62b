"""Optional conversion of a verified download to raw (``cfg.force_raw``).

Runs under the base lock on the verified ``.part``: ``qemu-img convert`` with
an explicit ``-f`` (never a probe), sparse raw output to ``<sha1>.converted``;
the result is re-inspected and checked against the policy as raw, and hashed
so ``cache verify`` can re-check the file that is actually in ``_base``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from cowfleet.cache.layout import BasePaths
from cowfleet.digest import hash_file
from cowfleet.formats.inspection import qemu_format_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Converted:
    virtual_size: int
    sha512: str


def to_raw(
    paths: BasePaths, dir_fd: int, src_format: str, max_virtual_size: int, image_id: str
) -> Converted:
    from cowfleet import qemuimg
    from cowfleet.formats import policy
    from cowfleet.formats.inspector import inspect_path

    # qemu-img opens the target by name: make sure nothing is planted there
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.converted.name, dir_fd=dir_fd)
    qemuimg.convert(paths.part, qemu_format_name(src_format), paths.converted, "raw", sparse=True)
    inspection = inspect_path(paths.converted)
    policy.check("raw", inspection, max_virtual_size=max_virtual_size).raise_if_unsafe(
        image_id=image_id, stage="after conversion to raw"
    )
    digest = hash_file(paths.converted, "sha512")
    fd = os.open(paths.converted.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("image %s: converted %s to raw", image_id, src_format)
    return Converted(virtual_size=inspection.virtual_size, sha512=digest)
