"""Check a qcow2 file's tables against the file itself, before the file is used.

The streaming inspector judges the header and where the tables start. What the tables
hold (where each L2 table, refcount block and data cluster lies) can only be judged
once the whole file is on disk, so the image service runs :func:`check_file` before an
upload becomes ``active`` and the node cache before a ``.part`` becomes a base.

:func:`check_tables` is pure: it reads through a ``read(offset, length)`` callable the
caller owns. It reads the L1 tables (the active one and each snapshot's), every L2
table they name (one cluster at a time) and the refcount table, in pieces of at most
:data:`READ_STEP` bytes; it never reads a data cluster or a refcount block. Memory is
those pieces plus two bitmaps of one bit per host cluster of the file (2 KiB for a
1 GiB file of 64 KiB clusters).

Each entry must lie inside the file (a table entirely, a data cluster at least its
first byte, a compressed cluster up to the 512-byte sector that holds its last byte),
be aligned as qcow2.txt requires, keep its reserved bits clear, and not land on other
metadata (the header cluster, an L1 or refcount table, the snapshot table, a refcount
block, an L2 table). The first problem found raises
:class:`~cowfleet.errors.UnsafeImageError` naming the table, the entry and the offset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowfleet.errors import ImageFormatError, LocalIOError, UnsafeImageError
from cowfleet.formats.inspection import Qcow2Header
from cowfleet.formats.qcow2 import MAX_L1_BYTES, MAX_SNAPSHOTS, parse_header

Read = Callable[[int, int], bytes]
"""``read(offset, length)``: up to ``length`` bytes of the file at ``offset``."""

READ_STEP = 1 << 20  # L1 and refcount tables are read in pieces of at most this
HEADER_READ = 64 * 1024  # first read of the file; the first cluster when larger
SECTOR = 512  # compressed cluster sizes count 512-byte sectors

# Entry layouts (qcow2.txt "Cluster mapping", "Host cluster management").
L1E_OFFSET = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
L1E_RESERVED = 0x7F00_0000_0000_01FF  # bits 0-8 and 56-62
L2E_COPIED = 1 << 63
L2E_COMPRESSED = 1 << 62
L2E_OFFSET = 0x00FF_FFFF_FFFF_FE00  # standard descriptor: bits 9-55
L2E_RESERVED = 0x3F00_0000_0000_01FE  # standard descriptor: bits 1-8 and 56-61
L2E_ZERO = 1  # bit 0 (v3 without extended L2 entries only)
RTE_RESERVED = 0x1FF  # refcount table entry: bits 0-8
SUBCLUSTER_ALLOC = 0xFFFF_FFFF
MAX_META_SET = 1 << 18  # metadata clusters kept in a set for the fast L2 check
MAX_SNAPSHOT_EXTRA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
_SNAPSHOT_HEAD = struct.Struct(">QIHHIIQII")  # the 40 fixed bytes of a snapshot entry


@dataclass(frozen=True)
class TableCheck:
    """What :func:`check_tables` looked at (all of it passed)."""

    l1_tables: int  # the active L1 table and one per snapshot
    l2_tables: int  # distinct L2 tables read
    data_clusters: int  # allocated standard clusters seen (counted once per L2 entry)
    compressed_clusters: int
    refcount_blocks: int
    bytes_read: int


def _repeat(mask: int, n: int) -> int:
    """``mask`` in each of ``n`` big-endian 64-bit slots, as one integer."""
    return int.from_bytes(mask.to_bytes(8, "big") * n, "big")


def _refuse(code: str, message: str, **context: Any) -> UnsafeImageError:
    from cowfleet.formats.policy import Failure

    return UnsafeImageError(
        f"image refused: {code}: {message}", [Failure(code, message)], **context
    )


class _Checker:
    def __init__(self, h: Qcow2Header, read: Read, file_size: int, context: dict[str, Any]):
        self.h = h
        self.read = read
        self.size = file_size
        self.context = context
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        nbits = -(-file_size // self.cs) + 1
        self.meta = bytearray(-(-nbits // 8))  # clusters holding metadata
        self.l2 = bytearray(len(self.meta))  # L2 tables still to walk
        # The same clusters (but the header's) as a set, while small: lets a whole L2
        # table be checked at C speed (see l2_table_fast).
        self.meta_set: set[int] | None = set()
        self.file_clusters = -(-file_size // self.cs)
        n = self.cs // 8
        self.words = struct.Struct(f">{n}Q")
        self.fast_bad = _repeat(L2E_RESERVED | L2E_COMPRESSED | (self.cs - 1) & ~0x1FF, n)
        self.fast_off = _repeat(L2E_OFFSET, n)
        self.bytes_read = 0
        self.l2_tables = self.data = self.compressed = self.refblocks = 0

    def fail(self, code: str, message: str, table: str, offset: int) -> UnsafeImageError:
        return _refuse(code, message, table=table, offset=offset, **self.context)

    def get(self, offset: int, length: int, what: str) -> bytes:
        data = self.read(offset, length)
        if len(data) != length:
            raise ImageFormatError(
                f"short read of the qcow2 {what} at offset {offset}: {len(data)} of {length} "
                "bytes (did the file change while it was checked?)",
                **self.context,
            )
        self.bytes_read += length
        return data

    def entries(self, offset: int, count: int, what: str) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(index of the first, entries) of ``count`` big-endian u64 at ``offset``."""
        per = READ_STEP // 8
        for first in range(0, count, per):
            n = min(per, count - first)
            yield first, struct.unpack(f">{n}Q", self.get(offset + first * 8, n * 8, what))

    def claim(self, what: str, offset: int, length: int, past_end_code: str) -> None:
        """Mark ``[offset, offset+length)`` as metadata: inside the file, overlapping none."""
        if length <= 0:
            return
        if offset % self.cs:
            raise self.fail(
                "table-unaligned",
                f"qcow2 {what} offset {offset} is not aligned to the cluster size {self.cs}",
                what,
                offset,
            )
        if offset + length > self.size:
            raise self.fail(
                past_end_code,
                f"qcow2 {what} at offset {offset} ({length} bytes) runs past the end of the "
                f"file ({self.size} bytes)",
                what,
                offset,
            )
        meta = self.meta
        for idx in range(offset >> self.cb, ((offset + length - 1) >> self.cb) + 1):
            if meta[idx >> 3] >> (idx & 7) & 1:
                raise self.fail(
                    "metadata-overlap",
                    f"qcow2 {what} at offset {offset} overlaps other qcow2 metadata "
                    f"(cluster at offset {idx << self.cb})",
                    what,
                    offset,
                )
            meta[idx >> 3] |= 1 << (idx & 7)
            if self.meta_set is not None:
                self.meta_set.add(idx)
                if len(self.meta_set) > MAX_META_SET:
                    self.meta_set = None

    # -- pass 1: where the tables are -------------------------------------------------
    def l1_tables(self) -> list[tuple[str, int, int]]:
        h = self.h
        self.meta[0] |= 1  # the header cluster
        tables = [("L1 table", h.l1_table_offset, h.l1_size)]
        self.claim("L1 table", h.l1_table_offset, h.l1_size * 8, "l1-table-past-end")
        self.claim(
            "refcount table",
            h.refcount_table_offset,
            h.refcount_table_clusters * self.cs,
            "refcount-table-past-end",
        )
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise self.fail(
                "invalid-header",
                f"qcow2 image claims {h.nb_snapshots} snapshots (qemu allows {MAX_SNAPSHOTS})",
                "snapshot table",
                h.snapshots_offset,
            )
        pos = h.snapshots_offset
        for n in range(h.nb_snapshots):
            what = f"snapshot table entry {n}"
            if pos + _SNAPSHOT_HEAD.size > self.size:
                raise self.fail(
                    "snapshots-past-end",
                    f"qcow2 {what} at offset {pos} runs past the end of the file "
                    f"({self.size} bytes)",
                    "snapshot table",
                    pos,
                )
            l1_off, l1_size, id_len, name_len, *_, extra = _SNAPSHOT_HEAD.unpack(
                self.get(pos, _SNAPSHOT_HEAD.size, what)
            )
            if extra > MAX_SNAPSHOT_EXTRA or l1_size * 8 > MAX_L1_BYTES:
                raise self.fail(
                    "invalid-header",
                    f"qcow2 {what} at offset {pos} declares {extra} bytes of extra data and "
                    f"an L1 table of {l1_size} entries (qemu allows {MAX_SNAPSHOT_EXTRA} and "
                    f"{MAX_L1_BYTES // 8})",
                    "snapshot table",
                    pos,
                )
            tables.append((f"snapshot {n} L1 table", l1_off, l1_size))
            pos += (_SNAPSHOT_HEAD.size + extra + id_len + name_len + 7) & ~7
        if h.nb_snapshots:
            self.claim(
                "snapshot table", h.snapshots_offset, pos - h.snapshots_offset, "snapshots-past-end"
            )
            for what, offset, count in tables[1:]:
                self.claim(what, offset, count * 8, "l1-table-past-end")
        return tables

    def refcount_blocks(self) -> None:
        h = self.h
        count = h.refcount_table_clusters * self.cs // 8
        for first, entries in self.entries(h.refcount_table_offset, count, "refcount table"):
            for i, e in enumerate(entries):
                if not e:
                    continue
                where = f"refcount table entry {first + i}"
                if e & RTE_RESERVED:
                    raise self.fail(
                        "table-entry-reserved-bits",
                        f"qcow2 {where} (0x{e:016x}) has reserved bits set",
                        "refcount table",
                        h.refcount_table_offset + (first + i) * 8,
                    )
                self.claim(
                    f"refcount block named by {where}", e, self.cs, "refcount-block-past-end"
                )
                self.refblocks += 1

    def mark_l2(self, table: str, l1_offset: int, count: int) -> None:
        for first, entries in self.entries(l1_offset, count, table):
            for i, e in enumerate(entries):
                if not e:
                    continue
                where = f"{table} entry {first + i}"
                if e & L1E_RESERVED:
                    raise self.fail(
                        "table-entry-reserved-bits",
                        f"qcow2 {where} (0x{e:016x}) has reserved bits set",
                        table,
                        l1_offset + (first + i) * 8,
                    )
                off = e & L1E_OFFSET
                if not off:
                    continue
                idx = off >> self.cb
                if idx < len(self.l2) * 8 and self.l2[idx >> 3] >> (idx & 7) & 1:
                    continue  # shared with another L1 table (a snapshot)
                self.claim(f"L2 table named by {where}", off, self.cs, "l2-table-past-end")
                self.l2[idx >> 3] |= 1 << (idx & 7)

    # -- pass 2: what the L2 tables point to ------------------------------------------
    def walk_l2(self, table: str, l1_offset: int, count: int) -> None:
        for _first, entries in self.entries(l1_offset, count, table):
            for e in entries:
                off = e & L1E_OFFSET
                idx = off >> self.cb
                if off and self.l2[idx >> 3] >> (idx & 7) & 1:
                    self.l2[idx >> 3] &= ~(1 << (idx & 7)) & 0xFF  # walk each table once
                    self.l2_table(off)

    def l2_table(self, l2_offset: int) -> None:
        h, cs, cb, size, meta = self.h, self.cs, self.cb, self.size, self.meta
        buf = self.get(l2_offset, cs, "L2 table")
        self.l2_tables += 1
        ext = h.extended_l2
        if not ext and not h.has_data_file_bit and self.l2_table_fast(buf):
            return
        words = self.words.unpack(buf)
        step = 2 if ext else 1
        reserved = L2E_RESERVED | (L2E_ZERO if ext else 0)
        data_file = h.has_data_file_bit  # offsets then point into another file
        for i in range(0, len(words), step):
            e = words[i]
            if e & L2E_COMPRESSED:
                self.compressed_cluster(e, l2_offset, i // step, words[i + 1] if ext else 0)
                continue
            off = e & L2E_OFFSET
            if e & reserved or (ext and not off and words[i + 1] & SUBCLUSTER_ALLOC):
                raise self.l2_fail(
                    "table-entry-reserved-bits",
                    "has reserved bits set (or allocated subclusters without a host cluster)",
                    l2_offset,
                    i // step,
                    e,
                )
            if data_file:
                continue
            if not off:
                if e & L2E_COPIED:
                    raise self.l2_fail(
                        "metadata-overlap",
                        "maps a data cluster onto the header (offset 0 with bit 63 set)",
                        l2_offset,
                        i // step,
                        e,
                    )
                continue
            if off & (cs - 1):
                raise self.l2_fail(
                    "table-unaligned",
                    f"points to a data cluster at offset {off}, not aligned to {cs}",
                    l2_offset,
                    i // step,
                    e,
                )
            if off >= size:
                raise self.l2_fail(
                    "data-cluster-past-end",
                    f"points to a data cluster at offset {off}, past the end of the file "
                    f"({size} bytes)",
                    l2_offset,
                    i // step,
                    e,
                )
            idx = off >> cb
            if meta[idx >> 3] >> (idx & 7) & 1:
                raise self.l2_fail(
                    "metadata-overlap",
                    f"points to a data cluster at offset {off}, which holds qcow2 metadata",
                    l2_offset,
                    i // step,
                    e,
                )
            self.data += 1

    def l2_table_fast(self, buf: bytes) -> bool:
        """True when every entry of a standard L2 table passes, judged at C speed.

        False when the table needs the entry-by-entry loop: it holds a compressed entry,
        or something is wrong (the loop then names the first bad entry).
        """
        if self.meta_set is None:
            return False
        whole = int.from_bytes(buf, "big")
        if whole & self.fast_bad:  # reserved bits, compressed, misaligned offsets
            return False
        words = self.words.unpack(buf)
        if words.count(L2E_COPIED) or words.count(L2E_COPIED | L2E_ZERO):
            return False  # allocated at offset 0: the header
        # Offsets are aligned now, so shifting the whole table shifts each entry alone.
        clusters = self.words.unpack(((whole & self.fast_off) >> self.cb).to_bytes(len(buf)))
        if max(clusters) >= self.file_clusters or not self.meta_set.isdisjoint(clusters):
            return False
        self.data += len(clusters) - clusters.count(0)
        return True

    def compressed_cluster(self, e: int, l2_offset: int, index: int, bitmap: int) -> None:
        x = 62 - (self.cb - 8)
        off = e & ((1 << x) - 1)
        sectors = ((e >> x) & ((1 << (self.cb - 8)) - 1)) + 1
        if e & L2E_COPIED or off >> 56 or bitmap:
            raise self.l2_fail(
                "table-entry-reserved-bits",
                "describes a compressed cluster with reserved bits set",
                l2_offset,
                index,
                e,
            )
        end = (off & ~(SECTOR - 1)) + sectors * SECTOR
        # The last sector may be cut by the end of the file: qemu writes only the
        # compressed bytes, and the count names whole sectors.
        if off >= self.size or end > -(-self.size // SECTOR) * SECTOR:
            raise self.l2_fail(
                "compressed-cluster-past-end",
                f"describes a compressed cluster at offset {off} ({sectors} sectors, up to "
                f"{end}) past the end of the file ({self.size} bytes)",
                l2_offset,
                index,
                e,
            )
        last = min(end, self.size) - 1
        for idx in range(off >> self.cb, (last >> self.cb) + 1):
            if self.meta[idx >> 3] >> (idx & 7) & 1:
                raise self.l2_fail(
                    "metadata-overlap",
                    f"describes a compressed cluster at offset {off} that overlaps qcow2 metadata",
                    l2_offset,
                    index,
                    e,
                )
        self.compressed += 1

    def l2_fail(self, code: str, what: str, l2_offset: int, index: int, e: int) -> Exception:
        entry = 16 if self.h.extended_l2 else 8
        return self.fail(
            code,
            f"qcow2 L2 table at offset {l2_offset}, entry {index} (0x{e:016x}) {what}",
            "L2 table",
            l2_offset + index * entry,
        )


def check_tables(h: Qcow2Header, read: Read, file_size: int, **context: Any) -> TableCheck:
    """Check every table entry of the qcow2 image whose header is ``h``.

    ``read(offset, length)`` reads the file, ``file_size`` is its length. Raises
    :class:`UnsafeImageError` (code, table and offset in ``failures`` and ``context``)
    for the first entry that points outside the file, is misaligned, sets reserved bits
    or lands on other metadata; :class:`ImageFormatError` on a short read. ``context``
    (e.g. ``image_id``) is added to the error.
    """
    c = _Checker(h, read, file_size, context)
    tables = c.l1_tables()
    c.refcount_blocks()
    for table in tables:
        c.mark_l2(*table)
    for table in tables:
        c.walk_l2(*table)
    return TableCheck(
        l1_tables=len(tables),
        l2_tables=c.l2_tables,
        data_clusters=c.data,
        compressed_clusters=c.compressed,
        refcount_blocks=c.refblocks,
        bytes_read=c.bytes_read,
    )


def check_fd(fd: int, **context: Any) -> TableCheck:
    """:func:`check_tables` for the qcow2 file open at ``fd`` (header parsed here)."""
    size = os.fstat(fd).st_size

    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    head = read(0, min(size, HEADER_READ))
    h = parse_header(head, file_size=size)
    if h.cluster_size > len(head) and size > len(head):
        h = parse_header(read(0, min(size, h.cluster_size)), file_size=size)
    return check_tables(h, read, size, **context)


def check_file(path: Path | str, *, dir_fd: int | None = None, **context: Any) -> TableCheck:
    """:func:`check_fd` for ``path`` (relative to ``dir_fd`` when given; never a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        raise LocalIOError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
    try:
        return check_fd(fd, **context)
    except OSError as exc:
        raise LocalIOError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    finally:
        os.close(fd)
