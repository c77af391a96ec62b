"""The streaming format inspector (sans-I/O).

Feed it the bytes of an image in chunks of any size; :meth:`Inspector.finish` returns
an :class:`~cowfleet.formats.inspection.Inspection`. It captures only bounded regions
(the first :data:`~cowfleet.formats.probes.HEAD_SIZE` bytes, a few regions that a
header points to, and the last 512 bytes), so memory is bounded by constants. Once the
regions are captured, :meth:`Inspector.feed` only counts bytes and keeps the tail,
which makes it cheap enough to ride inside every download and upload.

The verdict does not depend on how the stream is cut: a region is captured only when
it starts at or after the end of the region whose content asked for it, so whether it
is still ahead of the stream never depends on chunk boundaries.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from pathlib import Path

from cowfleet import safeopen
from cowfleet.errors import LocalIOError, MissingFileError, UsageError
from cowfleet.formats import probes
from cowfleet.formats.inspection import Finding, Inspection
from cowfleet.formats.probes import HEAD_SIZE, TAIL_SIZE, Probe, Request, View

log = logging.getLogger(__name__)

MAX_REQUESTS = 8  # regions beyond the head, all probes together
MAX_CAPTURE = HEAD_SIZE + MAX_REQUESTS * probes.MAX_REGION  # bytes held, at most (768 KiB)

# Exceptions a probe may raise on malformed bytes; turned into findings.
_PROBE_ERRORS = (struct.error, IndexError, ValueError, OverflowError, KeyError, TypeError)


class Inspector:
    """Sans-I/O format inspector: ``feed`` chunks, then ``finish``."""

    def __init__(self) -> None:
        self._pos = 0
        self._regions: dict[int, bytes] = {}
        self._pending: dict[int, tuple[int, bytearray]] = {}
        self._requested: set[tuple[int, int]] = set()
        self._tail = b""
        self._finished = False
        self._add(Request(0, HEAD_SIZE, 0))

    # -- state ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every region it needs is captured; later feeds only count bytes."""
        return not self._pending

    @property
    def position(self) -> int:
        """Bytes seen so far (fed or skipped)."""
        return self._pos

    def next_needed(self) -> tuple[int, int] | None:
        """``(offset, length)`` of the next bytes a region needs, for random-access readers."""
        best: tuple[int, int] | None = None
        for start, (length, buf) in self._pending.items():
            cur = start + len(buf)
            if best is None or cur < best[0]:
                best = (cur, start + length - cur)
        return best

    # -- feeding ----------------------------------------------------------------------

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """The next bytes of the stream."""
        self.feed_at(self._pos, chunk)

    def feed_at(self, offset: int, chunk: bytes | bytearray | memoryview) -> None:
        """Bytes at ``offset`` (>= :attr:`position`); the skipped bytes count as seen."""
        if self._finished:
            raise UsageError("inspector fed after finish()")
        if offset < self._pos:
            raise UsageError(f"inspector fed at offset {offset}, behind position {self._pos}")
        n = len(chunk)
        if n == 0:
            return
        if self._pending:
            raw = chunk if type(chunk) is bytes else None
            self._capture(offset, memoryview(chunk).cast("B"), raw)
        if n >= TAIL_SIZE:
            self._tail = bytes(chunk[n - TAIL_SIZE :])
        elif offset == self._pos:
            self._tail = (self._tail + bytes(chunk))[-TAIL_SIZE:]
        else:
            self._tail = bytes(chunk)
        self._pos = offset + n

    def _add(self, req: Request) -> None:
        key = (req.offset, req.length)
        if req.length <= 0 or key in self._requested or req.offset < req.after:
            return
        if any(
            start <= req.offset and req.offset + req.length <= start + len(data)
            for start, data in self._regions.items()
        ):
            return
        if len(self._requested) > MAX_REQUESTS:
            log.debug("inspector: region request %s dropped (limit)", key)
            return
        self._requested.add(key)
        self._pending[req.offset] = (req.length, bytearray())

    def _capture(self, offset: int, mv: memoryview, raw: bytes | None) -> None:
        end = offset + len(mv)
        changed = True
        while changed:
            changed = False
            for start, (length, buf) in list(self._pending.items()):
                cur = start + len(buf)
                if cur < offset:  # skipped over by feed_at: keep what we have
                    self._complete(start, bytes(buf))
                    changed = True
                    continue
                if cur >= end:
                    continue
                stop = min(start + length, end)
                if not buf and stop == start + length:
                    # The whole region is in this chunk: one copy (none for exact bytes).
                    piece = mv[cur - offset : stop - offset]
                    exact = raw is not None and len(piece) == len(raw)
                    self._complete(start, raw if exact and raw is not None else piece.tobytes())
                    changed = True
                    continue
                buf += mv[cur - offset : stop - offset]
                if len(buf) == length:
                    self._complete(start, bytes(buf))
                    changed = True

    def _complete(self, start: int, data: bytes) -> None:
        del self._pending[start]
        self._regions[start] = data
        view = View(self._regions, b"", self._pos, final=False)
        try:
            requests = probes.plan(view)
        except _PROBE_ERRORS as exc:  # malformed tables: the probes report it at finish
            log.debug("inspector: planning failed: %s", exc)
            return
        for req in requests:
            self._add(req)

    # -- result -----------------------------------------------------------------------

    def finish(self, total_size: int | None = None) -> Inspection:
        """The inspection of everything fed (``total_size``: the true size, if larger)."""
        if self._finished:
            raise UsageError("inspector finish() called twice")
        self._finished = True
        data_size = self._pos
        tail = self._tail
        if total_size is not None:
            if total_size < self._pos:
                raise UsageError(f"total_size {total_size} is below the {self._pos} bytes fed")
            if total_size > self._pos:
                data_size, tail = total_size, b""
        for start, (_length, buf) in list(self._pending.items()):
            self._regions[start] = bytes(buf)
        self._pending.clear()
        return _judge(View(self._regions, tail, data_size, final=True), self._requested)


def _judge(view: View, requested: set[tuple[int, int]]) -> Inspection:
    found: list[Probe] = []
    for probe in probes.PROBES:
        try:
            p = probe(view)
        except _PROBE_ERRORS as exc:
            name = probe.__name__.removeprefix("probe_")
            p = Probe(name if name != "qcow1" else "qcow")
            p.findings.append(Finding("invalid-header", f"{p.format} header unreadable: {exc}"))
        if p is not None:
            found.append(p)
    data_size = view.data_size
    complete = all(
        view.read(off, min(length, data_size - off)) is not None
        for off, length in requested
        if off < data_size
    ) and len(view.tail) == min(TAIL_SIZE, data_size)
    findings: list[Finding] = []
    if data_size == 0:
        findings.append(Finding("empty", "the image has no data (0 bytes)"))
    if not found:
        return Inspection(
            format="raw",
            virtual_size=data_size,
            data_size=data_size,
            matches=(),
            partition_table=probes.partition_table(view.head),
            findings=tuple(findings),
            complete=complete,
        )
    main = found[0]
    matches = tuple(dict.fromkeys(p.format for p in found))
    return Inspection(
        format=main.format,
        virtual_size=main.virtual_size if main.virtual_size is not None else 0,
        data_size=data_size,
        matches=matches,
        qcow2=main.qcow2,
        vmdk=main.vmdk,
        partition_table=probes.partition_table(view.head) if main.format == "iso" else None,
        cluster_size=main.cluster_size,
        encrypted=main.encrypted,
        findings=tuple(findings + main.findings),
        complete=complete,
        parent=main.parent,
        encryption=main.encryption,
    )


def inspect_bytes(data: bytes | bytearray | memoryview) -> Inspection:
    """Inspect an image held in memory."""
    insp = Inspector()
    insp.feed(data)
    return insp.finish()


def inspect_path(path: Path, *, strict: bool = True) -> Inspection:
    """Inspect a file, reading only the regions the inspector needs (head, tables, tail).

    ``strict`` (files in folders others could write to, such as ``_base``): the file is
    opened through :mod:`cowfleet.safeopen` (its name no symlink; a regular file with
    one link owned by us or root, or a block device) and the descriptor that passed
    those checks is the one inspected. ``strict=False`` is for a file a user names on
    the command line: symlinks are followed and only the type is checked.
    """
    if strict:
        fd = safeopen.open_path(path, allow_block=True)
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise MissingFileError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
        except OSError as exc:
            raise LocalIOError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
    try:
        return inspect_fd(fd, str(path))
    finally:
        os.close(fd)


def inspect_fd(fd: int, display: str) -> Inspection:
    """Inspect the regular file or block device open on ``fd`` (``display`` names it
    in errors). Reads with ``pread`` only; the descriptor's offset is not used."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise LocalIOError(f"{display} is not a regular file or block device", path=display)
        insp = Inspector()
        for _ in range(4 * MAX_REQUESTS):
            need = insp.next_needed()
            if need is None or need[0] >= size:
                break
            offset, length = need
            data = os.pread(fd, min(length, size - offset), offset)
            if not data:
                break
            insp.feed_at(offset, data)
        if size > insp.position:
            start = max(insp.position, size - TAIL_SIZE)
            insp.feed_at(start, os.pread(fd, size - start, start))
        return insp.finish(total_size=size)
    except OSError as exc:
        raise LocalIOError(f"cannot read {display}: {exc.strerror}", path=display) from exc


__all__ = ["MAX_CAPTURE", "Inspector", "inspect_bytes", "inspect_fd", "inspect_path"]
