"""qcow2 header parsing (sans-I/O) against byte-built headers."""

from __future__ import annotations

import struct

import pytest

from cowfleet.errors import ImageFormatError
from cowfleet.formats import qcow2
from tests.unit import hostile_corpus as hc


def test_v3_fields() -> None:
    h = qcow2.parse_header(
        hc.qcow2(size=20 * hc.GIB, cluster_bits=16, compat=1, compression=1, incompat=1 << 3)
    )
    assert (h.version, h.cluster_bits, h.cluster_size, h.virtual_size) == (3, 16, 65536, 20 << 30)
    assert h.compat == "1.1"
    assert h.lazy_refcounts and not h.dirty and not h.corrupt
    assert h.compression_type == "zstd"
    assert h.refcount_bits == 16
    assert h.header_length == 112
    assert h.l1_table_offset == 3 * 65536 and h.l1_size == 40
    assert h.refcount_table_offset == 65536 and h.refcount_table_clusters == 1
    assert h.backing_file is None and not h.has_backing and h.data_file is None
    assert h.encryption is None


def test_v2_defaults() -> None:
    h = qcow2.parse_header(hc.qcow2(version=2))
    assert h.version == 2 and h.compat == "0.10"
    assert h.refcount_order == 4 and h.incompatible_features == 0
    assert h.header_length == 72 and h.compression_type == "zlib"


def test_backing_file_and_format_extension() -> None:
    h = qcow2.parse_header(hc.qcow2(backing=b"/var/base.img", backing_format=b"raw"))
    assert h.backing_file == "/var/base.img"
    assert h.backing_format == "raw"
    assert h.has_backing
    assert qcow2.EXT_BACKING_FORMAT in h.extension_types


def test_backing_name_outside_buffer_is_still_declared() -> None:
    data = hc.qcow2(backing=b"/x", backing_offset=1 << 20)
    h = qcow2.parse_header(data)
    assert h.backing_file is None and h.has_backing
    codes = [f.code for f in qcow2.layout_findings(h, len(data))]
    assert codes == ["backing-file-name-past-end"]


def test_data_file_extension_and_bit() -> None:
    h = qcow2.parse_header(hc.qcow2(data_file=b"/dev/sdb", incompat=1 << 2))
    assert h.data_file == "/dev/sdb" and h.has_data_file_bit
    h2 = qcow2.parse_header(hc.qcow2(data_file=b"/dev/sdb"))
    assert h2.data_file == "/dev/sdb" and not h2.has_data_file_bit


def test_encryption_and_fde_extension() -> None:
    assert qcow2.parse_header(hc.qcow2(crypt_method=1)).encryption == "aes"
    h = qcow2.parse_header(hc.qcow2(crypt_method=2, fde=True))
    assert h.encryption == "luks" and h.has_fde_extension


def test_feature_name_table_and_unknown_bits() -> None:
    table = bytes([0, 40]) + b"future".ljust(46, b"\0")
    h = qcow2.parse_header(hc.qcow2(incompat=1 << 40, extra_exts=((hc.EXT_FEATURE_NAMES, table),)))
    assert h.feature_names == ((0, 40, "future"),)
    assert h.unknown_incompatible == 1 << 40


def test_bitmaps_extension_recorded() -> None:
    h = qcow2.parse_header(hc.qcow2(extra_exts=((hc.EXT_BITMAPS, b"\0" * 24),)))
    assert h.has_bitmaps_extension


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "truncated"),
        (hc.qcow2()[:71], "truncated"),
        (hc.qcow2()[:90], "truncated"),
        (b"QFI\xfa" + hc.qcow2()[4:], "magic"),
        (hc.qcow2()[:4] + struct.pack(">I", 4) + hc.qcow2()[8:], "version"),
        (hc.qcow2()[:20] + struct.pack(">I", 8) + hc.qcow2()[24:], "cluster_bits"),
        (hc.qcow2()[:20] + struct.pack(">I", 22) + hc.qcow2()[24:], "cluster_bits"),
        (hc.qcow2(header_length=96), "header_length"),
        (hc.qcow2(header_length=108), "multiple of 8"),
        (hc.qcow2(refcount_order=7), "refcount_order"),
        (hc.qcow2(backing=b"x" * 1024), "longer than 1023"),
    ],
)
def test_garbage_is_refused(data: bytes, words: str) -> None:
    with pytest.raises(ImageFormatError, match=words):
        qcow2.parse_header(data)


def test_extension_without_end_marker() -> None:
    cs = 512
    data = bytearray(hc.qcow2(cluster_bits=9))
    # Fill the rest of the first cluster with an unknown extension chain that never ends.
    pos = 112
    while pos + 8 <= cs:
        struct.pack_into(">II", data, pos, 0x12345678, 0)
        pos += 8
    with pytest.raises(ImageFormatError, match="end marker"):
        qcow2.parse_header(bytes(data))


def test_extension_longer_than_cluster() -> None:
    data = bytearray(hc.qcow2(cluster_bits=9))
    struct.pack_into(">II", data, 112, 0x12345678, 1 << 30)
    with pytest.raises(ImageFormatError, match="runs past"):
        qcow2.parse_header(bytes(data))


def test_extension_beyond_buffer_and_file() -> None:
    data = hc.qcow2()[:116]
    with pytest.raises(ImageFormatError, match="end of the file"):
        qcow2.parse_header(data, file_size=116)
    with pytest.raises(ImageFormatError, match="beyond the first"):
        qcow2.parse_header(data)


def test_layout_findings_valid_image_is_clean() -> None:
    data = hc.qcow2()
    assert qcow2.layout_findings(qcow2.parse_header(data), len(data)) == []


def test_layout_findings_unaligned_and_huge_tables() -> None:
    data = hc.qcow2(l1_offset=3 * 65536 + 8, refcount_clusters=1 << 20)
    h = qcow2.parse_header(data)
    codes = {f.code for f in qcow2.layout_findings(h, len(data))}
    assert {"table-unaligned", "refcount-table-too-large", "refcount-table-past-end"} <= codes


def test_huge_declared_sizes_do_not_allocate() -> None:
    # A 2**63-byte disk with a 2**31-entry L1 table: parsing is instant and small.
    data = hc.qcow2(size=(1 << 63) - 1, l1_size=(1 << 31))
    h = qcow2.parse_header(data)
    codes = {f.code for f in qcow2.layout_findings(h, len(data))}
    assert "l1-table-too-large" in codes and "l1-table-past-end" in codes


@pytest.mark.parametrize(
    "data",
    [
        hc.qcow2(compression=7, incompat=1 << 3),
        hc.qcow2(compression=1),  # zstd without the feature bit
        hc.qcow2(incompat=1 << 3),  # the bit without zstd
        hc.qcow2(nb_snapshots=70000, snapshots_offset=65536),
    ],
    ids=["unknown-compression", "zstd-no-bit", "bit-no-zstd", "too-many-snapshots"],
)
def test_layout_findings_header_values_qemu_rejects(data: bytes) -> None:
    h = qcow2.parse_header(data)
    assert "invalid-header" in {f.code for f in qcow2.layout_findings(h, len(data))}
