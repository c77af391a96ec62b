"""The streaming inspector: detection, virtual sizes, chunking, bounded memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet.errors import LocalIOError, UsageError
from cowfleet.formats import probes
from cowfleet.formats.inspector import MAX_CAPTURE, Inspector, inspect_bytes, inspect_path
from tests.unit import hostile_corpus as hc


def feed_in(data: bytes, size: int) -> Inspector:
    insp = Inspector()
    for i in range(0, len(data), size):
        insp.feed(data[i : i + size])
    return insp


@pytest.mark.parametrize(
    ("data", "fmt", "vsize"),
    [
        (hc.qcow2(size=5 * hc.GIB), "qcow2", 5 * hc.GIB),
        (hc.qcow2(version=2, size=hc.MIB), "qcow2", hc.MIB),
        (hc.qcow1(size=3 * hc.MIB), "qcow", 3 * hc.MIB),
        (hc.qed(size=7 * hc.MIB), "qed", 7 * hc.MIB),
        (hc.vmdk_sparse(capacity_sectors=4096), "vmdk", 4096 * 512),
        (hc.vmdk_sparse(capacity_sectors=8, stream_footer_capacity=4096), "vmdk", 4096 * 512),
        (
            hc.vmdk_descriptor("monolithicFlat", ('RW 100 FLAT "a" 0', "RW 28 ZERO")),
            "vmdk",
            128 * 512,
        ),
        (hc.vhd_fixed(hc.MIB), "vhd", hc.MIB),
        (hc.vhd_dynamic(16 * hc.MIB), "vhd", 16 * hc.MIB),
        (hc.vhdx(size=9 * hc.GIB), "vhdx", 9 * hc.GIB),
        (hc.vdi(size=33 * hc.MIB), "vdi", 33 * hc.MIB),
        (hc.luks1(payload_sectors=8), "luks", 4096 + 64 * 1024 - 8 * 512),
        (hc.luks2(), "luks", 64 * 1024),
        (hc.iso(), "iso", 64 * 1024),
        (b"\x01" * 1000, "raw", 1000),
    ],
)
def test_detects_format_and_virtual_size(data: bytes, fmt: str, vsize: int) -> None:
    insp = inspect_bytes(data)
    assert insp.format == fmt
    assert insp.virtual_size == vsize
    assert insp.data_size == len(data)
    assert insp.matches == (() if fmt == "raw" else (fmt,))
    assert insp.complete


def test_qcow2_fields_reported() -> None:
    insp = inspect_bytes(hc.qcow2(backing=b"/b", backing_format=b"qcow2", compat=1))
    assert insp.qcow2 is not None and insp.cluster_size == 65536
    assert insp.backing_file == "/b" and insp.qcow2.backing_format == "qcow2"
    assert insp.qcow2.lazy_refcounts


def test_encryption_reported() -> None:
    assert inspect_bytes(hc.qcow2(crypt_method=1)).encryption == "aes"
    assert inspect_bytes(hc.luks1()).encryption == "luks1"
    assert inspect_bytes(hc.luks2()).encrypted


@pytest.mark.parametrize(("data", "table"), [(hc.mbr_disk(), "mbr"), (hc.gpt_disk(), "gpt")])
def test_partition_tables_on_raw(data: bytes, table: str) -> None:
    insp = inspect_bytes(data)
    assert insp.format == "raw" and insp.partition_table == table and insp.matches == ()


def test_isohybrid_keeps_iso_and_mbr() -> None:
    insp = inspect_bytes(hc.iso(mbr=True))
    assert insp.format == "iso" and insp.partition_table == "mbr"


def test_polyglot_matches_every_signature() -> None:
    data = bytearray(hc.qcow2())
    data[0x8000:0x8006] = b"\x01CD001"
    assert inspect_bytes(bytes(data)).matches == ("qcow2", "iso")
    assert inspect_bytes(hc.qcow2() + hc.vhd_footer(size=hc.MIB)).matches == ("qcow2", "vhd")


def test_vmdk_descriptor_far_into_file_is_captured() -> None:
    # Descriptor at 1 MiB, past the head: captured as a separate bounded region.
    desc = hc.vmdk_descriptor("streamOptimized")
    data = hc.vmdk_sparse(descriptor_offset_sectors=2048, pad_to=2 * hc.MIB, descriptor=desc)
    insp = inspect_bytes(data)
    assert insp.vmdk is not None and insp.vmdk.create_type == "streamOptimized"
    assert insp.complete


def test_vhdx_metadata_past_head_needs_the_bytes() -> None:
    data = hc.vhdx(size=123 * hc.MIB)
    insp = Inspector()
    insp.feed(data[: 2 * hc.MIB])
    assert not insp.done
    result = insp.finish(total_size=len(data))
    assert result.format == "vhdx" and not result.complete
    # A stream that really ends there has no metadata at all: a finding, not "incomplete".
    short = Inspector()
    short.feed(data[: 2 * hc.MIB])
    ended = short.finish()
    assert ended.complete and [f.code for f in ended.findings] == ["invalid-header"]


@pytest.mark.parametrize("size", [1, 7, 511, 512, 4096, 65536, 1 << 20])
@pytest.mark.parametrize(
    "data",
    [
        hc.qcow2(),
        hc.vhdx(),
        hc.vhd_fixed(),
        hc.vhd_dynamic(),
        hc.iso(mbr=True),
        hc.vmdk_sparse(descriptor_offset_sectors=2048, pad_to=2 * hc.MIB),
        hc.vmdk_sparse(stream_footer_capacity=4096),
    ],
    ids=["qcow2", "vhdx", "vhd-fixed", "vhd-dynamic", "iso", "vmdk-far-descriptor", "vmdk-footer"],
)
def test_verdict_independent_of_chunking(data: bytes, size: int) -> None:
    if size < 4096 and len(data) > 300_000:
        size += 4093  # tiny chunks over megabytes are slow in Python; keep the cut odd
    assert feed_in(data, size).finish() == inspect_bytes(data)


def test_done_after_regions_and_tail_only_counts() -> None:
    data = hc.qcow2()
    insp = Inspector()
    insp.feed(data)
    assert insp.done
    insp.feed(memoryview(b"\0" * 10_000))
    result = insp.finish()
    assert result.data_size == len(data) + 10_000
    assert result.format == "qcow2"


def test_memory_is_bounded_by_constants() -> None:
    insp = Inspector()
    chunk = b"\0" * (1 << 20)
    for _ in range(8):
        insp.feed(chunk)
    held = sum(len(v) for v in insp._regions.values()) + len(insp._tail)
    assert held <= MAX_CAPTURE <= 1 << 20
    assert len(insp._tail) == probes.TAIL_SIZE


def test_reused_buffer_is_copied() -> None:
    buf = bytearray(hc.qcow2())
    insp = Inspector()
    insp.feed(memoryview(buf))
    buf[:] = b"\0" * len(buf)
    assert insp.finish().format == "qcow2"


def test_misuse_raises_usage_error() -> None:
    insp = Inspector()
    insp.feed(b"abc")
    with pytest.raises(UsageError):
        insp.feed_at(1, b"x")
    with pytest.raises(UsageError):
        insp.finish(total_size=1)
    insp2 = Inspector()
    insp2.finish()
    with pytest.raises(UsageError):
        insp2.feed(b"x")
    with pytest.raises(UsageError):
        insp2.finish()


def test_finish_with_larger_total_size_is_incomplete() -> None:
    insp = Inspector()
    insp.feed(hc.qcow2())
    result = insp.finish(total_size=10 * hc.MIB)
    assert result.data_size == 10 * hc.MIB and not result.complete


def test_empty_input() -> None:
    insp = inspect_bytes(b"")
    assert insp.format == "raw" and insp.virtual_size == 0
    assert [f.code for f in insp.findings] == ["empty"]


@pytest.mark.parametrize(
    "data",
    [
        hc.qcow2(),
        hc.qcow2(backing=b"/etc/passwd"),
        hc.vhdx(),
        hc.vhd_fixed(),
        hc.vhd_dynamic(),
        hc.vmdk_sparse(descriptor_offset_sectors=2048, pad_to=2 * hc.MIB),
        hc.iso(),
        b"",
        b"tiny",
        hc.luks2(),
        hc.vdi(),
    ],
)
def test_inspect_path_equals_streaming(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "img"
    path.write_bytes(data)
    assert inspect_path(path) == inspect_bytes(data)


def test_inspect_path_sparse_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with path.open("wb") as f:
        f.write(hc.qcow2(size=100 * hc.GIB))
        f.truncate(50 * hc.GIB)
    insp = inspect_path(path)
    assert insp.format == "qcow2" and insp.data_size == 50 * hc.GIB and insp.complete


def test_inspect_path_errors(tmp_path: Path) -> None:
    with pytest.raises(LocalIOError, match="cannot open"):
        inspect_path(tmp_path / "missing")
    with pytest.raises(LocalIOError, match="not a regular file"):
        inspect_path(tmp_path)


def test_memoryview_slice_of_larger_buffer() -> None:
    image = hc.qcow2(backing=b"/b")
    big = b"\xaa" * 3 + image + b"\xbb" * 300_000
    insp = Inspector()
    insp.feed(memoryview(big)[3 : 3 + len(image)])
    assert insp.finish() == inspect_bytes(image)
