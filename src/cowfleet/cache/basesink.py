"""The ``_base`` entry's sink: claim (or resume) ``<sha1>.part`` under the base lock.

The fetch engine writes the bytes (:class:`cowfleet.fetch.partsink.PartSink`, with the
format inspector on); this module decides whether an earlier ``.part`` may be resumed.
It may when its record (``.part`` metadata) names the same image, size and digest and
the file is a plain file of ours (:func:`cowfleet.safeopen.open_existing`); anything
else is removed and a new ``.part`` is created ``O_EXCL``. The engine re-verifies the
kept bytes before it continues.

The record also carries the part's checkpoint (see :mod:`cowfleet.fetch.engine`): a
run that stops fsyncs the ``.part`` and then records how many of its bytes passed the
hash tree. A run that resumes takes the checkpoint and at once rewrites the record
without it, so a run that dies (a crash, a kill) leaves none behind and the next one
re-reads every kept byte; a checkpoint therefore only ever vouches for bytes that were
checked and made durable before it was written.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cowfleet import safeopen
from cowfleet.cache import metadata as md
from cowfleet.cache.layout import BasePaths
from cowfleet.errors import LocalIOError
from cowfleet.fetch.engine import Checkpoint, InspectorLike
from cowfleet.fetch.partsink import PartSink

log = logging.getLogger(__name__)


def unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", name, exc)


class RecordCheckpoints:
    """The checkpoint kept in a ``.part``'s record (see the module doc)."""

    def __init__(self, path: Path, record: md.PartMeta, taken: Checkpoint | None) -> None:
        self._path = path
        self._record = record
        self._taken = taken

    def load(self) -> Checkpoint | None:
        return self._taken

    def save(self, checkpoint: Checkpoint) -> None:
        record = replace(self._record, checked_by=checkpoint.key, checked=checkpoint.offset)
        md.write_atomic(self._path, record.to_json())


def _take_checkpoint(path: Path, record: md.PartMeta) -> RecordCheckpoints:
    """The record's checkpoint, removed from the record on disk before it is used."""
    taken = None
    if record.checked_by and record.checked > 0:
        taken = Checkpoint(record.checked_by, record.checked)
    bare = replace(record, checked_by=None, checked=0)
    if taken is not None:
        md.write_atomic(path, bare.to_json())
    return RecordCheckpoints(path, bare, taken)


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
        except (LocalIOError, FileNotFoundError) as exc:
            log.warning("cannot resume %s (%s); starting over", paths.part, exc)
        else:
            try:
                checkpoints = _take_checkpoint(paths.part_meta, old)
            except BaseException:
                os.close(fd)
                raise
            return PartSink(
                fd, display, inspector_factory=inspector_factory, checkpoints=checkpoints
            )
    if st is not None:
        log.info("removing stale %s", paths.part)
        unlink_at(dir_fd, part_name)
    md.write_atomic(paths.part_meta, record.to_json())
    fd = safeopen.create(dir_fd, part_name, display=display, mode=0o644, write_flags=os.O_RDWR)
    checkpoints = RecordCheckpoints(paths.part_meta, record, None)
    return PartSink(fd, display, inspector_factory=inspector_factory, checkpoints=checkpoints)
