"""The sink of a ``.part`` file: sparse positional writes, resume, fsync.

Both file-backed sinks are one of these on a descriptor their owner opened safely
(:mod:`cowfleet.safeopen`): the ``_base`` entry (:mod:`cowfleet.cache.basesink`
claims the ``.part``, and installs it) and a user's file (:mod:`cowfleet.fetch.tofile`).
All-zero 64 KiB blocks are not written, leaving holes; :meth:`PartSink.commit`
truncates to the full size (so trailing zeros stay holes too) and fsyncs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from cowfleet import safeopen
from cowfleet.errors import LocalIOError
from cowfleet.fetch.engine import Checkpoint, InspectorLike
from cowfleet.fsutil import WRITEBACK_STEP, start_writeback

log = logging.getLogger(__name__)

BLOCK = 64 * 1024  # hole granularity
_ZERO_BLOCK = bytes(BLOCK)


class CheckpointStore(Protocol):
    """Where a part's checkpoint lives between runs (the ``_base`` part's record)."""

    def load(self) -> Checkpoint | None:
        """The checkpoint an earlier run saved (taken once: see the implementation)."""
        ...

    def save(self, checkpoint: Checkpoint) -> None: ...


class PartSink:
    """A :class:`~cowfleet.fetch.engine.Sink` writing to ``fd`` (which it then owns).

    With a ``checkpoints`` store, a fetch that stops keeps a checkpoint: the file is
    fsynced first, so the bytes it vouches for survive a crash.
    """

    def __init__(
        self,
        fd: int,
        display: str,
        *,
        inspector_factory: Callable[[], InspectorLike] | None = None,
        checkpoints: CheckpointStore | None = None,
    ) -> None:
        self.fd = fd
        self.display = display
        self.inspector_factory = inspector_factory
        self.checkpoints = checkpoints
        self._writeback_from = 0  # writeback started for the bytes before this offset

    def checkpoint(self) -> Checkpoint | None:
        return self.checkpoints.load() if self.checkpoints is not None else None

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self.checkpoints is None:
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise self._error(exc, "sync") from exc
        self.checkpoints.save(checkpoint)

    def _error(self, exc: OSError, doing: str) -> LocalIOError:
        return safeopen.io_error(exc, self.display, doing)

    def kept(self) -> int:
        try:
            size = os.fstat(self.fd).st_size
        except OSError as exc:
            raise self._error(exc, "look at") from exc
        self._writeback_from = size
        return size

    def read_kept(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self.fd, size, offset)
        except OSError as exc:
            raise self._error(exc, "read") from exc

    def write(self, offset: int, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        mv = memoryview(chunk)
        try:
            start = -1
            for i in range(0, n, BLOCK):
                j = min(i + BLOCK, n)
                zero = (
                    mv[i] == 0
                    and mv[j - 1] == 0
                    and mv[(i + j) >> 1] == 0
                    and bytes(mv[i:j]) == _ZERO_BLOCK[: j - i]  # (a memoryview compares slowly)
                )
                if zero:
                    if start >= 0:
                        self._pwrite(mv[start:i], offset + start)
                        start = -1
                elif start < 0:
                    start = i
            if start >= 0:
                self._pwrite(mv[start:n], offset + start)
        except OSError as exc:
            raise self._error(exc, "write") from exc
        end = offset + n
        if end - self._writeback_from >= WRITEBACK_STEP:
            start_writeback(self.fd, self._writeback_from, end - self._writeback_from)
            self._writeback_from = end

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done

    def restart(self) -> None:
        self.cut(0)

    def cut(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise self._error(exc, "truncate") from exc
        self._writeback_from = min(self._writeback_from, size)

    def commit(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as exc:
            raise self._error(exc, "sync") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
