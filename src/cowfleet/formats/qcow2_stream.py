"""A standalone qcow2 v3 image written front to back, for a pipe (sans-I/O layout).

``qemu-img convert`` cannot write qcow2 to a pipe: it seeks back to fill in its
tables. When the set of guest clusters that hold data is known before the first
byte (a chain's allocation map), every table can be laid out up front::

    cluster 0        header (112 bytes, no extensions but the end marker)
    refcount table   -> refcount blocks (16-bit counts, every used cluster 1)
    refcount blocks
    L1 table         -> one L2 table per 512 MiB (64 KiB clusters) that holds data
    L2 tables        -> data clusters, QCOW_OFLAG_COPIED set (refcount 1)
    data clusters    in guest order, one per guest cluster that holds data

:func:`plan` computes the geometry; :func:`metadata` yields the bytes before the
first data cluster; the caller then sends the data clusters in
:attr:`StreamLayout.runs` order. The file is exactly :attr:`StreamLayout.file_size`
bytes, so the upload's ``Content-Length`` is known at once. No backing file, no
snapshots: ``qemu-img check`` finds neither errors nor leaks.

Compressed clusters (``stored`` given to :func:`plan`): every data cluster's stored
length is known beforehand (the caller compressed them into a spool). A length below
the cluster size is a compressed cluster (raw deflate); the data area is then::

    compressed payloads   packed back to back in guest order, from data_offset
    (zeros to the next cluster boundary)
    plain clusters        the ones compression did not shrink, cluster aligned

Their L2 entries are compressed-cluster descriptors (bit 62, no COPIED flag): the byte
offset and the number of 512-byte sectors after the first that the payload touches;
a host cluster of the packed area counts one reference per payload whose sectors
touch it (two payloads may share a sector, and a payload may run into the next
cluster). The layout cannot be known before the payloads' lengths are: this is why a
compressed stream needs the spool while the plain one does not.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cowfleet.errors import UsageError, ValidationError

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 112
REFCOUNT_ORDER = 4  # 16-bit refcounts
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
SECTOR = 512
MAX_REFCOUNT = (1 << (1 << REFCOUNT_ORDER)) - 1
DEFAULT_CLUSTER_SIZE = 65536
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII B7x")
assert _HEADER.size == HEADER_LENGTH

Run = tuple[int, int]  # (first guest cluster, number of clusters)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class StreamLayout:
    """Where everything of a streamed qcow2 lives (offsets in bytes)."""

    cluster_size: int
    virtual_size: int
    runs: tuple[Run, ...]  # data clusters, sorted, disjoint, not adjacent
    data_clusters: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refcount_block_offset: int
    refcount_block_clusters: int
    l1_table_offset: int
    l1_clusters: int
    l2_indexes: tuple[int, ...]  # L1 indexes that get an L2 table, in file order
    l2_offset: int
    data_offset: int
    total_clusters: int
    # compressed layouts only (stored lengths given to plan): per data cluster in
    # guest order, its payload length (cluster_size: stored plain)
    stored: tuple[int, ...] | None = None
    compressed_bytes: int = 0  # the packed payloads
    compressed_clusters: int = 0  # host clusters the packed area takes
    compressed_refcounts: tuple[int, ...] = ()  # of each of those host clusters
    plain_clusters: int = 0  # data clusters stored uncompressed (all of them if stored is None)

    @property
    def plain_offset(self) -> int:
        """Where the first plain data cluster lies (after the packed payloads)."""
        return self.data_offset + self.compressed_clusters * self.cluster_size

    @property
    def file_size(self) -> int:
        return self.total_clusters * self.cluster_size

    @property
    def metadata_size(self) -> int:
        return self.data_offset


def clusters_of(extents: Sequence[tuple[int, int]], cluster_size: int) -> tuple[Run, ...]:
    """The guest clusters that ``(offset, length)`` extents touch, as merged runs."""
    runs: list[list[int]] = []
    for offset, length in sorted(extents):
        if length <= 0:
            continue
        first = offset // cluster_size
        end = _ceil_div(offset + length, cluster_size)
        if runs and first <= runs[-1][0] + runs[-1][1]:
            last = runs[-1]
            last[1] = max(last[1], end - last[0])
        else:
            runs.append([first, end - first])
    return tuple((a, n) for a, n in runs)


def _packed(stored: Sequence[int], cs: int) -> tuple[int, int, tuple[int, ...]]:
    """Bytes, host clusters and per-cluster refcounts of the packed compressed payloads."""
    counts: list[int] = []
    pos = 0
    for n in stored:
        if n >= cs:
            continue
        first = (pos - pos % SECTOR) // cs
        last = ((pos + n - 1) | (SECTOR - 1)) // cs
        if last >= len(counts):
            counts.extend([0] * (last + 1 - len(counts)))
        for k in range(first, last + 1):
            counts[k] += 1
        pos += n
    if counts and max(counts) > MAX_REFCOUNT:
        raise ValidationError("too many compressed clusters share one host cluster")
    return pos, _ceil_div(pos, cs), tuple(counts)


def plan(
    virtual_size: int,
    runs: Sequence[Run],
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    stored: Sequence[int] | None = None,
) -> StreamLayout:
    """The layout of a qcow2 of ``virtual_size`` holding the guest clusters in ``runs``.

    ``stored``: the length each data cluster takes in the file, in guest order
    (below ``cluster_size``: a compressed payload; ``cluster_size``: stored plain)."""
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or cluster_size & (cluster_size - 1) or not 9 <= bits <= 21:
        raise UsageError(f"cluster size {cluster_size} is not a power of two in 512..2097152")
    if virtual_size < 0:
        raise UsageError(f"negative virtual size {virtual_size}")
    guest_clusters = _ceil_div(virtual_size, cluster_size)
    runs = tuple(sorted((int(a), int(n)) for a, n in runs if n > 0))
    prev_end = -1
    for a, n in runs:
        if a < 0 or a + n > guest_clusters:
            raise ValidationError(f"data clusters {a}+{n} lie past the virtual size")
        if a < prev_end:
            raise ValidationError("data cluster runs overlap")
        prev_end = a + n
    l2_entries = cluster_size // 8
    l1_size = _ceil_div(guest_clusters, l2_entries)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValidationError(f"virtual size {virtual_size} needs too large an L1 table")
    l1_clusters = max(1, _ceil_div(l1_size * 8, cluster_size))
    l2_set: set[int] = set()
    for a, n in runs:
        l2_set.update(range(a // l2_entries, (a + n - 1) // l2_entries + 1))
    l2_indexes = tuple(sorted(l2_set))
    data = sum(n for _, n in runs)
    packed_bytes, packed = 0, 0
    counts: tuple[int, ...] = ()
    plain = data
    if stored is not None:
        stored = tuple(int(n) for n in stored)
        if len(stored) != data:
            raise ValidationError(f"{len(stored)} stored lengths for {data} data clusters")
        if any(not 0 < n <= cluster_size for n in stored):
            raise ValidationError(f"a stored length is not in 1..{cluster_size}")
        packed_bytes, packed, counts = _packed(stored, cluster_size)
        plain = sum(1 for n in stored if n == cluster_size)
    data_host = packed + plain  # host clusters of the data area
    per_block = cluster_size * 8 // (1 << REFCOUNT_ORDER)
    per_table_cluster = cluster_size // 8
    rt, rb = 1, 1
    while True:
        total = 1 + rt + rb + l1_clusters + len(l2_indexes) + data_host
        need_rb = _ceil_div(total, per_block)
        need_rt = _ceil_div(need_rb, per_table_cluster)
        if need_rb <= rb and need_rt <= rt:
            break
        rb, rt = max(rb, need_rb), max(rt, need_rt)
    if rt * cluster_size > MAX_REFTABLE_BYTES:
        raise ValidationError(f"a refcount table for {total} clusters is too large")
    rt_off = cluster_size
    rb_off = rt_off + rt * cluster_size
    l1_off = rb_off + rb * cluster_size
    l2_off = l1_off + l1_clusters * cluster_size
    data_off = l2_off + len(l2_indexes) * cluster_size
    if stored is not None and data_off + packed_bytes > 1 << (62 - (bits - 8)):
        raise ValidationError("compressed clusters would lie past the descriptor's offset range")
    return StreamLayout(
        cluster_size=cluster_size,
        virtual_size=virtual_size,
        runs=runs,
        data_clusters=data,
        l1_size=l1_size,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt,
        refcount_block_offset=rb_off,
        refcount_block_clusters=rb,
        l1_table_offset=l1_off,
        l1_clusters=l1_clusters,
        l2_indexes=l2_indexes,
        l2_offset=l2_off,
        data_offset=data_off,
        total_clusters=1 + rt + rb + l1_clusters + len(l2_indexes) + data_host,
        stored=stored,
        compressed_bytes=packed_bytes,
        compressed_clusters=packed,
        compressed_refcounts=counts,
        plain_clusters=plain,
    )


def header(layout: StreamLayout) -> bytes:
    """Cluster 0: the v3 header and the end-of-extensions marker, zero padded."""
    cs = layout.cluster_size
    head = _HEADER.pack(
        MAGIC,
        VERSION,
        0,  # backing file offset
        0,  # backing file size
        cs.bit_length() - 1,
        layout.virtual_size,
        0,  # no encryption
        layout.l1_size,
        layout.l1_table_offset,
        layout.refcount_table_offset,
        layout.refcount_table_clusters,
        0,  # snapshots
        0,
        0,  # incompatible features
        0,  # compatible features
        0,  # autoclear features
        REFCOUNT_ORDER,
        HEADER_LENGTH,
        0,  # compression type 0: zlib (raw deflate)
    )
    return head + bytes(8) + bytes(cs - len(head) - 8)


def _refcount_blocks(layout: StreamLayout) -> Iterator[bytes]:
    cs = layout.cluster_size
    per_block = cs * 8 // (1 << REFCOUNT_ORDER)
    if not layout.compressed_refcounts:
        one = struct.pack(">H", 1)
        left = layout.total_clusters
        for _ in range(layout.refcount_block_clusters):
            n = min(left, per_block)
            left -= n
            yield one * n + bytes((per_block - n) * 2)
        return
    first_packed = layout.data_offset // cs
    counts = [1] * first_packed
    counts += layout.compressed_refcounts
    counts += [1] * layout.plain_clusters
    counts += [0] * (layout.refcount_block_clusters * per_block - len(counts))
    for b in range(layout.refcount_block_clusters):
        yield struct.pack(f">{per_block}H", *counts[b * per_block : (b + 1) * per_block])


def compressed_entry(offset: int, length: int, cluster_size: int) -> int:
    """The L2 entry of a compressed payload of ``length`` bytes at file ``offset``."""
    x = 62 - (cluster_size.bit_length() - 1 - 8)
    extra = (offset + length - 1) // SECTOR - offset // SECTOR
    return OFLAG_COMPRESSED | extra << x | offset


def _data_entries(layout: StreamLayout) -> Iterator[int]:
    """The L2 entry of every data cluster, in guest order."""
    cs = layout.cluster_size
    if layout.stored is None:
        for rank in range(layout.data_clusters):
            yield (layout.data_offset + rank * cs) | OFLAG_COPIED
        return
    packed = layout.data_offset
    plain = layout.plain_offset
    for n in layout.stored:
        if n == cs:
            yield plain | OFLAG_COPIED
            plain += cs
        else:
            yield compressed_entry(packed, n, cs)
            packed += n


def _l2_tables(layout: StreamLayout) -> Iterator[bytes]:
    cs = layout.cluster_size
    l2_entries = cs // 8
    starts = [a for a, _ in layout.runs]
    entries = _data_entries(layout)  # consumed in guest order, as the tables are
    for l1_index in layout.l2_indexes:
        table = bytearray(cs)
        first = l1_index * l2_entries
        end = first + l2_entries
        i = max(0, bisect.bisect_right(starts, first) - 1)
        while i < len(layout.runs) and layout.runs[i][0] < end:
            a, n = layout.runs[i]
            lo, hi = max(a, first), min(a + n, end)
            for c in range(lo, hi):
                struct.pack_into(">Q", table, (c - first) * 8, next(entries))
            i += 1
        yield bytes(table)


def metadata(layout: StreamLayout) -> Iterator[bytes]:
    """Every byte before the first data cluster, a cluster (or a table) at a time."""
    cs = layout.cluster_size
    yield header(layout)
    table = bytearray(layout.refcount_table_clusters * cs)
    for i in range(layout.refcount_block_clusters):
        struct.pack_into(">Q", table, i * 8, layout.refcount_block_offset + i * cs)
    yield bytes(table)
    yield from _refcount_blocks(layout)
    l1 = bytearray(layout.l1_clusters * cs)
    for k, l1_index in enumerate(layout.l2_indexes):
        struct.pack_into(">Q", l1, l1_index * 8, (layout.l2_offset + k * cs) | OFLAG_COPIED)
    yield bytes(l1)
    yield from _l2_tables(layout)
