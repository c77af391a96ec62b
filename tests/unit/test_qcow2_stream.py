"""``formats.qcow2_stream``: the layout of a qcow2 written front to back (sans-I/O)."""

from __future__ import annotations

import struct

import pytest

from cowfleet.errors import UsageError, ValidationError
from cowfleet.formats import qcow2_stream as qs
from cowfleet.formats.qcow2 import parse_header

MiB = 1024 * 1024


def test_clusters_of_merges_and_rounds() -> None:
    runs = qs.clusters_of([(100, 10), (65536 * 3 + 5, 65536), (0, 1), (65536, 1)], 65536)
    assert runs == ((0, 2), (3, 2))


def test_plan_places_tables_before_data_and_counts_every_cluster() -> None:
    lay = qs.plan(2 * 1024 * MiB, ((0, 1), (9000, 3)), 65536)
    assert lay.l2_indexes == (0, 1)  # 8192 clusters per L2 table
    assert lay.data_clusters == 4
    assert lay.data_offset == lay.l2_offset + 2 * 65536
    assert lay.file_size == lay.data_offset + 4 * 65536
    body = b"".join(qs.metadata(lay))
    assert len(body) == lay.data_offset
    h = parse_header(body[:4096], file_size=lay.file_size)
    assert (h.version, h.cluster_size, h.virtual_size) == (3, 65536, 2 * 1024 * MiB)
    assert h.backing_file is None and h.l1_table_offset == lay.l1_table_offset
    # L2 entry of guest cluster 9001 (second table, index 809) -> third data cluster
    (e,) = struct.unpack_from(">Q", body, lay.l2_offset + 65536 + (9001 - 8192) * 8)
    assert e == (lay.data_offset + 2 * 65536) | qs.OFLAG_COPIED
    # refcounts: every used cluster 1, then zeros
    rb = body[lay.refcount_block_offset : lay.refcount_block_offset + 65536]
    counts = struct.unpack(f">{len(rb) // 2}H", rb)
    assert counts[: lay.total_clusters] == (1,) * lay.total_clusters
    assert not any(counts[lay.total_clusters :])


def test_plan_grows_refcount_blocks_for_many_small_clusters() -> None:
    lay = qs.plan(4 * MiB, ((0, 8192),), 512)  # 256 counts per block
    assert lay.refcount_block_clusters * 256 >= lay.total_clusters
    assert lay.refcount_block_clusters > 1


def test_plan_empty_disk_has_only_tables() -> None:
    lay = qs.plan(10 * MiB, (), 65536)
    assert lay.data_clusters == 0 and lay.l2_indexes == ()
    assert lay.file_size == lay.data_offset


@pytest.mark.parametrize(
    ("size", "runs", "cs"),
    [
        (MiB, ((16, 1),), 65536),  # past the end
        (MiB, ((0, 4), (2, 4)), 65536),  # overlapping
        (MiB, (), 1000),  # not a power of two
    ],
)
def test_plan_refuses_bad_input(size: int, runs: tuple[tuple[int, int], ...], cs: int) -> None:
    with pytest.raises((UsageError, ValidationError)):
        qs.plan(size, runs, cs)
