"""The ``_base`` entry's sink: claim (or resume) ``<sha1>.part`` under the base lock.

The fetch engine writes the bytes (:class:`cowfleet.fetch.partsink.PartSink`, with the
format inspector on); this module decides whether an earlier ``.part`` may be resumed.
It may when its record (``.part`` metadata) names the same image, size and digest and
the file is a plain file of ours (:func:`cowfleet.safeopen.open_existing`); anything
else is removed and a new ``.part`` is created ``O_EXCL``. The engine re-verifies the
kept bytes before it continues.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable

from cowfleet import safeopen
from cowfleet.cache import metadata as md
from cowfleet.cache.layout import BasePaths
from cowfleet.errors import LocalIOError
from cowfleet.fetch.engine import InspectorLike
from cowfleet.fetch.partsink import PartSink

log = logging.getLogger(__name__)


def unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", name, exc)


def claim_part(
    dir_fd: int,
    paths: BasePaths,
    record: md.PartMeta,
    inspector_factory: Callable[[], InspectorLike],
) -> PartSink:
    """The sink of ``paths.part`` for the fetch described by ``record`` (we hold the
    base lock): the earlier ``.part`` when it is the same fetch, else a new one."""
    part_name = paths.part.name
    display = str(paths.part)
    old = md.read_part_meta(paths.part_meta)
    try:
        st: os.stat_result | None = os.lstat(paths.part)
    except FileNotFoundError:
        st = None
    if (
        st is not None
        and stat.S_ISREG(st.st_mode)
        and old is not None
        and (old.image_id, old.image_size, old.hash_algo, old.hash_value)
        == (record.image_id, record.image_size, record.hash_algo, record.hash_value)
    ):
        try:
            fd = safeopen.open_existing(dir_fd, part_name, display=display, flags=os.O_RDWR)
            return PartSink(fd, display, inspector_factory=inspector_factory)
        except (LocalIOError, FileNotFoundError) as exc:
            log.warning("cannot resume %s (%s); starting over", paths.part, exc)
    if st is not None:
        log.info("removing stale %s", paths.part)
        unlink_at(dir_fd, part_name)
    md.write_atomic(paths.part_meta, record.to_json())
    fd = safeopen.create(dir_fd, part_name, display=display, mode=0o644, write_flags=os.O_RDWR)
    return PartSink(fd, display, inspector_factory=inspector_factory)
