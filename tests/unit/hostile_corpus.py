"""A corpus of hostile and corrupt disk images, byte-built with ``struct``.

Each :class:`Case` holds the bytes, the format it is declared as (a Glance
disk_format) and the failure codes the policy must report (empty = safe). The
builders are also used directly by the unit tests.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass

QCOW2_MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_DATA_FILE = 0x44415441
EXT_FDE = 0x0537BE77
EXT_BITMAPS = 0x23852875
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40


def _ext(ext_type: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", ext_type, len(data)) + data + b"\0" * pad


def qcow2(
    *,
    version: int = 3,
    size: int = 64 * MIB,
    cluster_bits: int = 16,
    backing: bytes | None = None,
    backing_offset: int | None = None,
    backing_format: bytes | None = None,
    data_file: bytes | None = None,
    incompat: int = 0,
    compat: int = 0,
    autoclear: int = 0,
    crypt_method: int = 0,
    fde: bool = False,
    extra_exts: tuple[tuple[int, bytes], ...] = (),
    l1_offset: int | None = None,
    l1_size: int | None = None,
    refcount_offset: int | None = None,
    refcount_clusters: int = 1,
    nb_snapshots: int = 0,
    snapshots_offset: int = 0,
    header_length: int = 112,
    compression: int = 0,
    refcount_order: int = 4,
    pad_to: int | None = None,
) -> bytes:
    """A qcow2 image: header cluster, refcount table + block, L1 table (all zeros).

    Table offsets default to a valid layout; override them to build hostile ones.
    """
    cs = 1 << cluster_bits
    l2_entries = cs // 8
    need_l1 = max(1, -(-size // (cs * l2_entries)))
    l1_size = need_l1 if l1_size is None else l1_size
    refcount_offset = cs if refcount_offset is None else refcount_offset
    l1_offset = 3 * cs if l1_offset is None else l1_offset
    exts = b""
    if backing_format is not None:
        exts += _ext(EXT_BACKING_FORMAT, backing_format)
    if data_file is not None:
        exts += _ext(EXT_DATA_FILE, data_file)
    if fde:
        exts += _ext(EXT_FDE, struct.pack(">QQ", 4 * cs, cs))
    for t, d in extra_exts:
        exts += _ext(t, d)
    exts += struct.pack(">II", 0, 0)
    hlen = 72 if version == 2 else header_length
    bf_off = 0
    bf_size = 0
    if backing is not None:
        bf_off = hlen + len(exts) if backing_offset is None else backing_offset
        bf_size = len(backing)
    hdr = struct.pack(
        ">4sIQIIQIIQQIIQ",
        QCOW2_MAGIC,
        version,
        bf_off,
        bf_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_offset,
        refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    )
    if version >= 3:
        hdr += struct.pack(">QQQII", incompat, compat, autoclear, refcount_order, hlen)
        hdr += bytes([compression]) + b"\0" * (hlen - 105)
    out = bytearray(hdr + exts)
    if backing is not None and backing_offset is None:
        out += backing
    elif backing is not None:
        assert backing_offset is not None
        if backing_offset + len(backing) <= cs:
            out += b"\0" * (backing_offset - len(out))
            out[backing_offset : backing_offset + len(backing)] = backing
    total = 4 * cs if pad_to is None else pad_to
    if len(out) < total:
        out += b"\0" * (total - len(out))
    # refcount table entry -> block at 2*cs; refcounts of clusters 0..3 = 1.
    if refcount_offset == cs and total >= 3 * cs:
        struct.pack_into(">Q", out, cs, 2 * cs)
        for i in range(4):
            struct.pack_into(">H", out, 2 * cs + 2 * i, 1)
    return bytes(out)


def qcow1(*, size: int = 16 * MIB, backing: bytes | None = None, crypt: int = 0) -> bytes:
    hdr = bytearray(4096)
    bf_off = 48 if backing else 0
    struct.pack_into(
        ">4sIQIIQBBHIQ",
        hdr,
        0,
        QCOW2_MAGIC,
        1,
        bf_off,
        len(backing or b""),
        0,
        size,
        12,
        9,
        0,
        crypt,
        4096,
    )
    if backing:
        hdr[48 : 48 + len(backing)] = backing
    return bytes(hdr)


def qed(*, size: int = 16 * MIB, backing: bytes | None = None) -> bytes:
    hdr = bytearray(4 * 65536)
    features = 1 if backing else 0
    struct.pack_into(
        "<4sIIIQQQQQII",
        hdr,
        0,
        b"QED\0",
        65536,
        4,
        1,
        features,
        0,
        0,
        65536,
        size,
        512 if backing else 0,
        len(backing or b""),
    )
    if backing:
        hdr[512 : 512 + len(backing)] = backing
    return bytes(hdr)


def vmdk_descriptor(
    create_type: str = "monolithicSparse",
    extents: tuple[str, ...] = ('RW 2048 SPARSE "disk.vmdk"',),
    *,
    trailer: tuple[str, ...] = (),
    parent: str | None = None,
) -> bytes:
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        "CID=12345678",
        "parentCID=ffffffff" if parent is None else "parentCID=87654321",
        f'createType="{create_type}"',
    ]
    if parent is not None:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", ""]
    lines += ['ddb.virtualHWVersion = "4"', 'ddb.geometry.cylinders = "2"', *trailer]
    return ("\n".join(lines) + "\n").encode()


def _vmdk_header(capacity: int, desc_sector: int, desc_sectors: int, gd_offset: int) -> bytes:
    out = bytearray(512)
    struct.pack_into(
        "<4sIIQQQQIQQQ",
        out,
        0,
        b"KDMV",
        3,
        0x30003,
        capacity,
        128,
        desc_sector,
        desc_sectors,
        512,
        21,
        gd_offset,
        128,
    )
    out[73:77] = b"\n \r\n"
    return bytes(out)


def vmdk_sparse(
    *,
    capacity_sectors: int = 2048,
    descriptor: bytes | None = None,
    descriptor_offset_sectors: int = 1,
    descriptor_sectors: int = 20,
    pad_to: int = 64 * 1024,
    stream_footer_capacity: int | None = None,
) -> bytes:
    """A sparse VMDK; with ``stream_footer_capacity`` its grain directory is "at end" and a
    footer (marker, header copy, end-of-stream marker) closes the file."""
    if descriptor is None:
        descriptor = vmdk_descriptor()
    gd = 0xFFFFFFFFFFFFFFFF if stream_footer_capacity is not None else 25
    out = bytearray(pad_to)
    out[:512] = _vmdk_header(capacity_sectors, descriptor_offset_sectors, descriptor_sectors, gd)
    d = descriptor_offset_sectors * 512
    text = descriptor[: descriptor_sectors * 512]
    if d + len(text) <= len(out):
        out[d : d + len(text)] = text
    if stream_footer_capacity is not None:
        marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
        copy = _vmdk_header(stream_footer_capacity, descriptor_offset_sectors, 20, 40)
        out += marker + copy + b"\0" * 512
    return bytes(out)


def vhd_footer(
    *, size: int = 16 * MIB, disk_type: int = 2, data_offset: int = 0xFFFFFFFFFFFFFFFF
) -> bytes:
    f = bytearray(512)
    sectors = size // 512
    heads, spt = 16, 63
    cyls = min(sectors // (heads * spt), 65535)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBI",
        f,
        0,
        b"conectix",
        2,
        0x10000,
        data_offset,
        0,
        b"qem2",
        0x50003,
        b"Wi2k",
        size,
        size,
        cyls,
        heads,
        spt,
        disk_type,
    )
    checksum = ~sum(f) & 0xFFFFFFFF
    struct.pack_into(">I", f, 64, checksum)
    return bytes(f)


def vhd_fixed(size: int = 1 * MIB) -> bytes:
    return b"\0" * size + vhd_footer(size=size, disk_type=2)


def vhd_dynamic(size: int = 16 * MIB, *, differencing: bool = False) -> bytes:
    footer = vhd_footer(size=size, disk_type=4 if differencing else 3, data_offset=512)
    dyn = bytearray(1024)
    struct.pack_into(
        ">8sQQIII", dyn, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, 1536, 0x10000, 8, 0x200000
    )
    if differencing:
        dyn[64 : 64 + 20] = "../base.vhd".encode("utf-16-be")[:20]
    bat = b"\xff" * 512
    return footer + bytes(dyn) + bat + footer


def vhdx(*, size: int = 64 * MIB, parent: bool = False, meta_offset: int = 3 * MIB) -> bytes:
    out = bytearray(meta_offset + 0x20000)
    out[0:8] = b"vhdxfile"
    region_guid = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    t = 0x30000
    struct.pack_into("<4sIII", out, t, b"regi", 0, 1, 0)
    out[t + 16 : t + 32] = region_guid
    struct.pack_into("<QII", out, t + 32, meta_offset, 0x100000, 1)
    items = [(uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le, 0x10000, 8)]
    if parent:
        items.append((uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le, 0x10008, 8))
    struct.pack_into("<8sHH", out, meta_offset, b"metadata", 0, len(items))
    for i, (g, off, ln) in enumerate(items):
        e = meta_offset + 32 + 32 * i
        out[e : e + 16] = g
        struct.pack_into("<IIII", out, e + 16, off, ln, 0, 0)
    struct.pack_into("<Q", out, meta_offset + 0x10000, size)
    return bytes(out)


def vdi(*, size: int = 32 * MIB, image_type: int = 1) -> bytes:
    out = bytearray(1024)
    out[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    struct.pack_into("<III", out, 0x40, 0xBEDA107F, 0x00010001, 400)
    struct.pack_into("<I", out, 76, image_type)
    struct.pack_into("<II", out, 340, 512, 1024)
    struct.pack_into("<QI", out, 368, size, MIB)
    return bytes(out)


def luks1(payload_sectors: int = 4096, data: int = 64 * 1024) -> bytes:
    out = bytearray(4096 + data)
    struct.pack_into(
        ">6sH32s32s32sI",
        out,
        0,
        b"LUKS\xba\xbe",
        1,
        b"aes",
        b"xts-plain64",
        b"sha256",
        payload_sectors,
    )
    return bytes(out)


def luks2(data: int = 64 * 1024) -> bytes:
    out = bytearray(16384 + data)
    struct.pack_into(">6sHQ", out, 0, b"LUKS\xba\xbe", 2, 16384)
    meta = {"segments": {"0": {"type": "crypt", "offset": "16384", "size": "dynamic"}}}
    j = json.dumps(meta).encode()
    out[4096 : 4096 + len(j)] = j
    return bytes(out)


def iso(size: int = 64 * 1024, *, mbr: bool = False) -> bytes:
    out = bytearray(size)
    out[0x8000:0x8006] = b"\x01CD001"
    if mbr:
        out[510:512] = b"\x55\xaa"
    return bytes(out)


def mbr_disk(size: int = 64 * 1024) -> bytes:
    out = bytearray(size)
    out[446] = 0x80
    out[450] = 0x83
    out[510:512] = b"\x55\xaa"
    return bytes(out)


def gpt_disk(size: int = 64 * 1024) -> bytes:
    out = bytearray(mbr_disk(size))
    out[450] = 0xEE
    out[512:520] = b"EFI PART"
    return bytes(out)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    declared: str
    codes: frozenset[str]  # failure codes the policy must report; empty = safe

    @property
    def safe(self) -> bool:
        return not self.codes


def _c(name: str, data: bytes, declared: str, *codes: str) -> Case:
    return Case(name, data, declared, frozenset(codes))


def _vmdk_hidden_parent() -> bytes:
    """A descriptor declared 1 sector long whose text runs on (no NUL) into a parent hint
    that qemu, reading 10 KiB at sector 1, would follow."""
    text = vmdk_descriptor().ljust(600, b"\n") + b'parentFileNameHint="/etc/base.vmdk"\n'
    out = bytearray(vmdk_sparse(descriptor=b"", descriptor_sectors=1))
    out[512 : 512 + len(text)] = text
    return bytes(out)


def _polyglot_qcow2_iso() -> bytes:
    out = bytearray(qcow2(cluster_bits=16))
    out[0x8000:0x8006] = b"\x01CD001"
    return bytes(out)


def _raw_with_tail_vhd() -> bytes:
    return qcow2() + vhd_footer(size=MIB)


def corpus() -> list[Case]:
    """The hostile and corrupt images (plus a few valid controls)."""
    flat_extent = vmdk_descriptor("monolithicFlat", ('RW 2048 FLAT "/etc/shadow" 0',))
    late_extent = vmdk_descriptor(
        "monolithicSparse",
        ('RW 2048 SPARSE "disk.vmdk"',),
        trailer=('RW 2048 FLAT "/etc/passwd" 0',),
    )
    two_gb = vmdk_descriptor("twoGbMaxExtentSparse", ('RW 4192256 SPARSE "disk-s001.vmdk"',))
    return [
        # --- valid controls
        _c("qcow2-v3-valid", qcow2(), "qcow2"),
        _c("qcow2-v2-valid", qcow2(version=2), "qcow2"),
        _c("raw-mbr-valid", mbr_disk(), "raw"),
        _c("raw-gpt-valid", gpt_disk(), "raw"),
        _c("iso-isohybrid-valid", iso(mbr=True), "iso"),
        _c("vmdk-sparse-valid", vmdk_sparse(), "vmdk"),
        _c("vhd-fixed-valid", vhd_fixed(), "vhd"),
        _c("vhd-dynamic-valid", vhd_dynamic(), "vhd"),
        _c("vhdx-valid", vhdx(), "vhdx"),
        _c("vdi-valid", vdi(), "vdi"),
        # --- references to other files
        _c(
            "qcow2-backing-file",
            qcow2(backing=b"/etc/passwd", backing_format=b"raw"),
            "qcow2",
            "backing-file",
        ),
        _c(
            "qcow2-backing-json",
            qcow2(backing=b'json:{"file.filename":"/etc/passwd"}'),
            "qcow2",
            "backing-file",
            "json-filename",
        ),
        _c(
            "qcow2-backing-declared-raw",
            qcow2(backing=b"/etc/passwd"),
            "raw",
            "format-mismatch",
            "backing-file",
        ),
        _c(
            "qcow2-data-file",
            qcow2(data_file=b"/etc/passwd", incompat=1 << 2),
            "qcow2",
            "data-file",
        ),
        _c(
            "qcow2-data-file-json",
            qcow2(data_file=b'json:{"driver":"file"}', incompat=1 << 2),
            "qcow2",
            "data-file",
            "json-filename",
        ),
        _c(
            "qcow2-data-file-ext-no-bit",
            qcow2(data_file=b"/dev/sda"),
            "qcow2",
            "data-file-extension",
        ),
        _c(
            "qcow2-data-file-declared-raw",
            qcow2(data_file=b"/etc/passwd", incompat=1 << 2),
            "raw",
            "format-mismatch",
            "data-file",
        ),
        _c(
            "qcow2-backing-name-past-end",
            qcow2(backing=b"/etc/passwd", backing_offset=1 << 20),
            "qcow2",
            "backing-file",
            "backing-file-name-past-end",
        ),
        _c("qcow-v1", qcow1(), "qcow2", "format-mismatch", "unsupported-format"),
        _c(
            "qcow-v1-backing",
            qcow1(backing=b"/etc/passwd"),
            "qcow2",
            "format-mismatch",
            "unsupported-format",
            "backing-file",
        ),
        _c("qed", qed(), "raw", "format-mismatch", "unsupported-format"),
        _c(
            "qed-backing",
            qed(backing=b"/etc/passwd"),
            "raw",
            "format-mismatch",
            "unsupported-format",
            "backing-file",
        ),
        _c(
            "vmdk-flat-extent",
            flat_extent,
            "vmdk",
            "vmdk-create-type",
            "vmdk-extent",
            "vmdk-descriptor-file",
        ),
        _c(
            "vmdk-text-createtype-in-comment",
            b'# Disk DescriptorFile\n# createType="monolithicFlat"\nversion=1\n'
            b'createType="monolithicSparse"\n',
            "vmdk",
            "vmdk-create-type",
            "vmdk-descriptor-file",
        ),
        _c(
            "vmdk-parent-hint-in-comment",
            vmdk_sparse(
                descriptor=vmdk_descriptor(trailer=('# parentFileNameHint="/etc/base.vmdk"',))
            ),
            "vmdk",
            "backing-file",
        ),
        _c(
            "vmdk-parent-hint-past-declared-descriptor",
            _vmdk_hidden_parent(),
            "vmdk",
            "backing-file",
        ),
        _c("vmdk-extent-after-ddb", vmdk_sparse(descriptor=late_extent), "vmdk", "vmdk-extent"),
        _c(
            "vmdk-sparse-names-extent",
            vmdk_sparse(
                descriptor=vmdk_descriptor(
                    "monolithicSparse",
                    ('RW 2048 SPARSE "disk.vmdk"', 'RW 2048 FLAT "/dev/sda" 0'),
                )
            ),
            "vmdk",
            "vmdk-extent",
        ),
        _c(
            "vmdk-bad-create-type",
            vmdk_sparse(descriptor=vmdk_descriptor("vmfs")),
            "vmdk",
            "vmdk-create-type",
        ),
        _c(
            "vmdk-two-gb-text",
            two_gb,
            "vmdk",
            "vmdk-create-type",
            "vmdk-extent",
            "vmdk-descriptor-file",
        ),
        _c(
            "vmdk-parent",
            vmdk_sparse(descriptor=vmdk_descriptor(parent="/etc/base.vmdk")),
            "vmdk",
            "backing-file",
        ),
        _c(
            "vmdk-descriptor-past-end",
            vmdk_sparse(descriptor_offset_sectors=1 << 20, pad_to=4096)[:4096],
            "vmdk",
            "descriptor-past-end",
            "vmdk-descriptor-offset",
            "vmdk-create-type",
        ),
        _c(
            "vmdk-zero-capacity-descriptor",
            vmdk_sparse(
                capacity_sectors=0,
                descriptor=vmdk_descriptor("monolithicSparse", ('RW 2048 SPARSE "disk.vmdk"',)),
            ),
            "vmdk",
            "vmdk-zero-capacity",
        ),
        _c(
            "vmdk-sparse-extent-is-a-path",
            vmdk_sparse(
                descriptor=vmdk_descriptor("monolithicSparse", ('RW 2048 SPARSE "/srv/x.vmdk"',))
            ),
            "vmdk",
            "vmdk-extent",
        ),
        _c(
            "vmdk-descriptor-not-sector-1",
            vmdk_sparse(descriptor_offset_sectors=5),
            "vmdk",
            "vmdk-descriptor-offset",
        ),
        _c("vmdk-stream-footer-valid", vmdk_sparse(stream_footer_capacity=4096), "vmdk"),
        _c(
            "vmdk-stream-footer-huge",
            vmdk_sparse(stream_footer_capacity=1 << 40),
            "vmdk",
            "virtual-size-too-large",
        ),
        _c(
            "vmdk-stream-footer-missing",
            vmdk_sparse(stream_footer_capacity=4096)[:-1536],
            "vmdk",
            "invalid-header",
        ),
        _c("vhd-differencing", vhd_dynamic(differencing=True), "vhd", "backing-file"),
        _c("vhdx-parent-locator", vhdx(parent=True), "vhdx", "backing-file"),
        _c("vdi-differencing", vdi(image_type=4), "vdi", "backing-file"),
        # --- encryption
        _c("luks1-raw", luks1(), "raw", "format-mismatch", "encrypted"),
        _c("luks2-raw", luks2(), "raw", "format-mismatch", "encrypted"),
        _c("qcow2-aes", qcow2(crypt_method=1), "qcow2", "encrypted"),
        _c("qcow2-luks", qcow2(crypt_method=2, fde=True), "qcow2", "encrypted"),
        # --- features and structure
        _c(
            "qcow2-unknown-incompat",
            qcow2(incompat=1 << 40),
            "qcow2",
            "unknown-incompatible-features",
        ),
        _c("qcow2-corrupt-bit", qcow2(incompat=1 << 1), "qcow2", "corrupt"),
        _c("qcow2-l1-past-end", qcow2(l1_offset=1 << 40), "qcow2", "l1-table-past-end"),
        _c(
            "qcow2-refcount-past-end",
            qcow2(refcount_offset=1 << 40),
            "qcow2",
            "refcount-table-past-end",
        ),
        _c(
            "qcow2-snapshots-past-end",
            qcow2(nb_snapshots=3, snapshots_offset=1 << 40),
            "qcow2",
            "snapshots-past-end",
        ),
        _c("qcow2-l1-too-small", qcow2(size=TIB, l1_size=1), "qcow2", "l1-table-too-small"),
        _c(
            "qcow2-huge-virtual-size",
            qcow2(size=1 << 60, l1_size=8),
            "qcow2",
            "virtual-size-too-large",
            "l1-table-too-small",
        ),
        _c("qcow2-truncated-header", qcow2()[:50], "qcow2", "truncated-header"),
        _c(
            "qcow2-bad-cluster-bits",
            qcow2()[:20] + struct.pack(">I", 40) + qcow2()[24:],
            "qcow2",
            "invalid-header",
        ),
        _c(
            "qcow2-truncated-tables",
            qcow2()[:65536],
            "qcow2",
            "l1-table-past-end",
            "refcount-table-past-end",
        ),
        # --- format confusion
        _c("raw-declared-qcow2-bytes", qcow2(), "raw", "format-mismatch"),
        _c("vhd-declared-raw-bytes", b"\0" * 65536, "vhd", "format-mismatch"),
        _c("polyglot-qcow2-iso", _polyglot_qcow2_iso(), "qcow2", "polyglot"),
        _c("polyglot-qcow2-vhd-footer", _raw_with_tail_vhd(), "qcow2", "polyglot"),
        _c("iso-declared-qcow2", iso(), "qcow2", "format-mismatch"),
        _c("unknown-declared-format", qcow2(), "qcow3", "unknown-disk-format"),
        # --- degenerate input
        _c("zero-bytes", b"", "raw", "empty"),
        _c("garbage-declared-qcow2", bytes(range(256)) * 64, "qcow2", "format-mismatch"),
        _c("vmdk-magic-truncated", b"KDMV\x01\0\0\0", "vmdk", "truncated-header"),
        _c("vhd-cookie-truncated", b"conectix" + b"\0" * 100, "vhd", "truncated-header"),
    ]
