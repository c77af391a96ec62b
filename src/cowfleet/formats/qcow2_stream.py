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
compression, no snapshots: ``qemu-img check`` finds neither errors nor leaks.
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


def plan(
    virtual_size: int, runs: Sequence[Run], cluster_size: int = DEFAULT_CLUSTER_SIZE
) -> StreamLayout:
    """The layout of a qcow2 of ``virtual_size`` holding the guest clusters in ``runs``."""
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
    per_block = cluster_size * 8 // (1 << REFCOUNT_ORDER)
    per_table_cluster = cluster_size // 8
    rt, rb = 1, 1
    while True:
        total = 1 + rt + rb + l1_clusters + len(l2_indexes) + data
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
        total_clusters=1 + rt + rb + l1_clusters + len(l2_indexes) + data,
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
        0,  # zlib (unused: nothing is compressed)
    )
    return head + bytes(8) + bytes(cs - len(head) - 8)


def _refcount_blocks(layout: StreamLayout) -> Iterator[bytes]:
    cs = layout.cluster_size
    per_block = cs * 8 // (1 << REFCOUNT_ORDER)
    one = struct.pack(">H", 1)
    left = layout.total_clusters
    for _ in range(layout.refcount_block_clusters):
        n = min(left, per_block)
        left -= n
        yield one * n + bytes((per_block - n) * 2)


def _l2_tables(layout: StreamLayout) -> Iterator[bytes]:
    cs = layout.cluster_size
    l2_entries = cs // 8
    starts = [a for a, _ in layout.runs]
    ranks: list[int] = []  # data clusters before each run
    rank = 0
    for _, n in layout.runs:
        ranks.append(rank)
        rank += n
    for l1_index in layout.l2_indexes:
        table = bytearray(cs)
        first = l1_index * l2_entries
        end = first + l2_entries
        i = max(0, bisect.bisect_right(starts, first) - 1)
        while i < len(layout.runs) and layout.runs[i][0] < end:
            a, n = layout.runs[i]
            lo, hi = max(a, first), min(a + n, end)
            for c in range(lo, hi):
                off = layout.data_offset + (ranks[i] + c - a) * cs
                struct.pack_into(">Q", table, (c - first) * 8, off | OFLAG_COPIED)
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
