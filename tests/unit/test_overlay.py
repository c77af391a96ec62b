"""The pure-Python qcow2 overlay writer: structure read back by the header parser, refusals."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from cowfleet.errors import (
    ConflictError,
    LocalIOError,
    MissingFileError,
    UnsafeImageError,
    UsageError,
    ValidationError,
)
from cowfleet.formats import overlay
from cowfleet.formats.overlay import create_overlay, image_bytes, plan_layout
from cowfleet.formats.qcow2 import parse_header

GiB = 1024**3
CLUSTER_SIZES = [512 << i for i in range(13)]


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    p = tmp_path / "base.raw"
    with p.open("wb") as f:
        f.truncate(GiB)
    return p


def _refcounts(
    data: bytes, cluster_size: int, refcount_table_offset: int, rt_clusters: int
) -> dict[int, int]:
    """Every non-zero refcount the file declares, by cluster index (16-bit refcounts)."""
    table = struct.unpack_from(f">{rt_clusters * cluster_size // 8}Q", data, refcount_table_offset)
    counts: dict[int, int] = {}
    per_block = cluster_size // 2
    for i, block in enumerate(table):
        if block == 0:
            continue
        assert block % cluster_size == 0, f"refcount block {i} not cluster aligned"
        raw = data[block : block + cluster_size].ljust(cluster_size, b"\0")
        for j, n in enumerate(struct.unpack(f">{per_block}H", raw)):
            if n:
                counts[i * per_block + j] = n
    return counts


def _check_structure(data: bytes, *, cluster_size: int, virtual_size: int) -> None:
    h = parse_header(data, file_size=len(data))
    assert h.version == 3
    assert h.cluster_size == cluster_size
    assert h.virtual_size == virtual_size
    assert h.crypt_method == 0
    assert h.refcount_order == 4 and h.refcount_bits == 16
    assert h.header_length == 112
    assert h.compression_type == "zlib"
    assert h.incompatible_features == 0 and h.autoclear_features == 0
    assert h.nb_snapshots == 0
    # L1 table: one entry per L2 table's worth of guest data, zeroed, cluster aligned.
    l2_span = cluster_size * (cluster_size // 8)
    assert h.l1_size == -(-virtual_size // l2_span)
    if h.l1_size:
        assert h.l1_table_offset % cluster_size == 0
        assert len(data) == h.l1_table_offset + h.l1_size * 8
        assert data[h.l1_table_offset :] == b"\0" * (h.l1_size * 8)
    # Every cluster the file occupies has refcount exactly 1, and nothing else is counted.
    used = -(-len(data) // cluster_size)
    counts = _refcounts(data, cluster_size, h.refcount_table_offset, h.refcount_table_clusters)
    assert counts == dict.fromkeys(range(used), 1)
    # The tables do not overlap and all lie inside the counted clusters.
    rt_end = h.refcount_table_offset + h.refcount_table_clusters * cluster_size
    assert h.refcount_table_offset >= cluster_size
    if h.l1_size:
        assert h.l1_table_offset >= rt_end


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
def test_written_overlay_parses_back(tmp_path: Path, backing: Path, cluster_size: int) -> None:
    out = tmp_path / "disk"
    size = 20 * GiB + 7
    res = create_overlay(
        out, backing, "raw", size=size, cluster_size=cluster_size, backing_virtual_size=GiB
    )
    assert res.path == out
    assert res.virtual_size == 20 * GiB + 512  # rounded up to a sector, as qemu-img does
    assert res.cluster_size == cluster_size
    assert res.backing == backing and res.backing_format == "raw"
    data = out.read_bytes()
    h = parse_header(data, file_size=len(data))
    assert h.backing_file == str(backing)
    assert h.backing_format == "raw"
    assert h.data_file is None
    assert not h.lazy_refcounts and not h.dirty and not h.corrupt and not h.extended_l2
    _check_structure(data, cluster_size=cluster_size, virtual_size=res.virtual_size)


@pytest.mark.parametrize(
    ("cluster_size", "size"),
    [
        (512, 100 * GiB),  # L1 of 25 MiB: hundreds of refcount blocks, several table clusters
        (1024, 200 * GiB),
        (65536, 4 * 1024 * GiB),
        (2 * 1024 * 1024, 4 * 1024 * GiB),
        (65536, 0),
        (65536, 512),
    ],
)
def test_layout_geometry_in_memory(cluster_size: int, size: int) -> None:
    layout = plan_layout(size, cluster_size)
    pieces = overlay.build_metadata(layout, b"/base", b"raw", lazy_refcounts=False)
    data = image_bytes(layout, pieces)
    _check_structure(data, cluster_size=cluster_size, virtual_size=size)


def test_many_refcount_blocks_are_listed_in_table() -> None:
    layout = plan_layout(100 * GiB, 512)
    assert layout.refcount_block_clusters > 100
    assert layout.refcount_table_clusters > 1


def test_lazy_refcounts_bit(tmp_path: Path, backing: Path) -> None:
    out = tmp_path / "disk"
    create_overlay(out, backing, "raw", lazy_refcounts=True, backing_virtual_size=GiB)
    h = parse_header(out.read_bytes())
    assert h.lazy_refcounts
    assert h.compatible_features == 1


def test_vhd_alias_records_qemu_name(tmp_path: Path, backing: Path) -> None:
    out = tmp_path / "disk"
    res = create_overlay(out, backing, "vhd", backing_virtual_size=GiB)
    assert res.backing_format == "vpc"
    assert parse_header(out.read_bytes()).backing_format == "vpc"


def test_default_size_is_backing_virtual_size(tmp_path: Path, backing: Path) -> None:
    out = tmp_path / "disk"
    res = create_overlay(out, backing, "raw", backing_virtual_size=3 * GiB + 1)
    assert res.virtual_size == 3 * GiB + 512
    assert parse_header(out.read_bytes()).virtual_size == 3 * GiB + 512


def test_zero_size_has_no_l1_table(tmp_path: Path) -> None:
    base = tmp_path / "empty"
    base.write_bytes(b"")
    out = tmp_path / "disk"
    create_overlay(out, base, "raw", backing_virtual_size=0)
    h = parse_header(out.read_bytes())
    assert h.l1_size == 0 and h.l1_table_offset == 0
    _check_structure(out.read_bytes(), cluster_size=65536, virtual_size=0)


def test_tables_are_holes(tmp_path: Path, backing: Path) -> None:
    out = tmp_path / "disk"
    create_overlay(out, backing, "raw", size=200 * GiB, cluster_size=1024, backing_virtual_size=GiB)
    st = out.stat()
    assert st.st_size > 12 * 1024 * 1024  # a 12.5 MiB L1 table ...
    assert st.st_blocks * 512 < st.st_size // 4  # ... mostly not allocated


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [0, 256, 1000, 65535, 4 * 1024 * 1024, -65536])
def test_refuses_bad_cluster_size(tmp_path: Path, backing: Path, cluster_size: int) -> None:
    with pytest.raises(UsageError, match="cluster size"):
        create_overlay(
            tmp_path / "d", backing, "raw", cluster_size=cluster_size, backing_virtual_size=GiB
        )
    assert list(tmp_path.iterdir()) == [backing]


def test_refuses_size_smaller_than_backing(tmp_path: Path, backing: Path) -> None:
    with pytest.raises(ValidationError, match="smaller than the backing"):
        create_overlay(tmp_path / "d", backing, "raw", size=GiB - 512, backing_virtual_size=GiB)
    assert not (tmp_path / "d").exists()


def test_refuses_size_above_max(tmp_path: Path, backing: Path) -> None:
    with pytest.raises(ValidationError, match="maximum virtual size"):
        create_overlay(
            tmp_path / "d",
            backing,
            "raw",
            size=10 * GiB,
            backing_virtual_size=GiB,
            max_virtual_size=8 * GiB,
        )


def test_refuses_relative_backing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="absolute"):
        create_overlay(tmp_path / "d", Path("base.raw"), "raw", backing_virtual_size=GiB)


def test_refuses_nul_in_names(tmp_path: Path, backing: Path) -> None:
    with pytest.raises(UsageError, match="NUL"):
        create_overlay(tmp_path / "d\0x", backing, "raw", backing_virtual_size=GiB)
    with pytest.raises(UsageError, match="NUL"):
        create_overlay(tmp_path / "d", Path(f"{backing}\0"), "raw", backing_virtual_size=GiB)


def test_refuses_missing_backing(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="not found"):
        create_overlay(tmp_path / "d", tmp_path / "nope", "raw", backing_virtual_size=GiB)


def test_refuses_directory_backing(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a regular file"):
        create_overlay(tmp_path / "d", tmp_path, "raw", backing_virtual_size=GiB)


@pytest.mark.parametrize("fmt", ["", "qcow", "qed", "luks", "iso", "json", "raw,file"])
def test_refuses_unknown_backing_format(tmp_path: Path, backing: Path, fmt: str) -> None:
    with pytest.raises(UsageError, match="unknown backing format"):
        create_overlay(tmp_path / "d", backing, fmt, backing_virtual_size=GiB)


def test_refuses_name_that_does_not_fit_first_cluster(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 200) / ("y" * 200)
    deep.mkdir(parents=True)
    base = deep / "base"
    base.write_bytes(b"")
    with pytest.raises(ValidationError, match="does not fit"):
        create_overlay(tmp_path / "d", base, "raw", cluster_size=512, backing_virtual_size=0)
    # The same path fits a 64 KiB cluster.
    create_overlay(tmp_path / "d", base, "raw", backing_virtual_size=0)
    assert parse_header((tmp_path / "d").read_bytes()).backing_file == str(base)


def test_refuses_to_replace_its_own_backing(tmp_path: Path, backing: Path) -> None:
    hard = tmp_path / "hard"
    os.link(backing, hard)
    for out in (backing, hard):
        with pytest.raises(ValidationError, match="replace the backing file"):
            create_overlay(out, backing, "raw", backing_virtual_size=GiB)
    assert backing.stat().st_size == GiB
    # A symlink to the backing file is replaced by the overlay; the backing file stays.
    link = tmp_path / "alias"
    link.symlink_to(backing)
    create_overlay(link, backing, "raw", backing_virtual_size=GiB)
    assert not link.is_symlink() and backing.stat().st_size == GiB


def test_refuses_too_large_l1(tmp_path: Path, backing: Path) -> None:
    with pytest.raises(ValidationError, match="too large"):
        create_overlay(
            tmp_path / "d",
            backing,
            "raw",
            size=200 * GiB,
            cluster_size=512,
            backing_virtual_size=GiB,
        )


# ---- atomic write ----------------------------------------------------------------------


def test_replace_false_keeps_existing_file(tmp_path: Path, backing: Path) -> None:
    out = tmp_path / "disk"
    out.write_bytes(b"guest data")
    with pytest.raises(ConflictError):
        create_overlay(out, backing, "raw", backing_virtual_size=GiB, replace=False)
    assert out.read_bytes() == b"guest data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.raw", "disk"]


def test_replaces_symlink_without_following_it(tmp_path: Path, backing: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "disk"
    out.symlink_to(victim)
    create_overlay(out, backing, "raw", backing_virtual_size=GiB)
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink()
    assert out.read_bytes()[:4] == b"QFI\xfb"


def test_missing_directory_is_local_io_error(tmp_path: Path, backing: Path) -> None:
    with pytest.raises(LocalIOError):
        create_overlay(tmp_path / "no" / "disk", backing, "raw", backing_virtual_size=GiB)


def test_no_temp_file_left_when_rename_fails(tmp_path: Path, backing: Path) -> None:
    out = tmp_path / "disk"
    out.mkdir()  # renaming a file over a directory fails
    (out / "x").write_bytes(b"")
    with pytest.raises(LocalIOError):
        create_overlay(out, backing, "raw", backing_virtual_size=GiB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.raw", "disk"]


def test_file_mode(tmp_path: Path, backing: Path) -> None:
    out = tmp_path / "disk"
    old = os.umask(0o022)
    try:
        create_overlay(out, backing, "raw", backing_virtual_size=GiB)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


# ---- the backing file is inspected and judged by the safety policy -------------------


def test_backing_with_its_own_backing_is_refused(tmp_path: Path, backing: Path) -> None:
    mid = tmp_path / "mid"
    create_overlay(mid, backing, "raw")  # inspected: a plain raw file passes
    with pytest.raises(UnsafeImageError) as err:
        create_overlay(tmp_path / "top", mid, "qcow2")
    assert "backing-file" in {f.code for f in err.value.failures}
    assert not (tmp_path / "top").exists()
    # A caller that vouches for the backing file (the node cache) may still layer on it.
    create_overlay(tmp_path / "top", mid, "qcow2", backing_virtual_size=GiB)


def test_declared_format_must_match_content(tmp_path: Path, backing: Path) -> None:
    with pytest.raises(UnsafeImageError) as err:
        create_overlay(tmp_path / "d", backing, "qcow2")  # raw bytes declared qcow2
    assert "format-mismatch" in {f.code for f in err.value.failures}
    qcow = tmp_path / "q"
    create_overlay(qcow, backing, "raw")
    with pytest.raises(UnsafeImageError):
        create_overlay(tmp_path / "d", qcow, "raw")  # qcow2 bytes declared raw


def test_backing_above_max_virtual_size_is_refused(tmp_path: Path, backing: Path) -> None:
    with pytest.raises(UnsafeImageError) as err:
        create_overlay(tmp_path / "d", backing, "raw", max_virtual_size=GiB // 2)
    assert "virtual-size-too-large" in {f.code for f in err.value.failures}


def test_default_size_from_inspection(tmp_path: Path) -> None:
    base = tmp_path / "b"
    with base.open("wb") as f:
        f.truncate(5 * 1024 * 1024 + 100)
    res = create_overlay(tmp_path / "d", base, "raw")
    assert res.virtual_size == 5 * 1024 * 1024 + 512  # raw size rounded to a sector
