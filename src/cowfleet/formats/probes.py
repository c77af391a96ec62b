"""Per-format signature probes for the inspector (sans-I/O).

Each probe reads captured regions through a :class:`View` and returns a
:class:`Probe` when its format's signature matches. Probes also say which further
regions of the file they need (:func:`plan`), e.g. a VMDK descriptor stored far
into the file or the VHDX metadata table. Every region is bounded by a constant.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from cowfleet.errors import ImageFormatError
from cowfleet.formats import qcow2
from cowfleet.formats.inspection import Finding, Qcow2Header, VmdkInfo

SECTOR = 512
HEAD_SIZE = 256 * 1024  # covers ISO descriptors (32 KiB+) and VHDX region tables (192 KiB)
TAIL_SIZE = 1536  # the VHD footer (last 512 B) and a VMDK stream footer (last 1536 B)
MAX_REGION = 64 * 1024  # any further region (VMDK descriptor, VHDX metadata table)
MAX_ITEM = 4096  # a VHDX metadata item

# qcow (v1), qed, vdi, vmdk, vhd, vhdx, luks, iso, partition tables.
QED_MAGIC = b"QED\0"
VMDK_SPARSE_MAGIC = b"KDMV"
VMDK_COWD_MAGIC = b"COWD"
VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
VMDK_QEMU_DESC_SIZE = 20 * 512  # what qemu reads at sector 1 when it looks for a parent
VHD_COOKIE = b"conectix"
VHD_DYNAMIC_COOKIE = b"cxsparse"
VHDX_SIGNATURE = b"vhdxfile"
VHDX_REGION_TABLE = 0x30000
VHDX_REGION_SIGNATURE = b"regi"
VHDX_METADATA_SIGNATURE = b"metadata"
VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VHDX_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
VDI_SIGNATURE_OFFSET = 0x40
VDI_SIGNATURE = 0xBEDA107F
VDI_DISK_SIZE_OFFSET = 368
VDI_IMAGE_TYPE_OFFSET = 76
LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS2_JSON_OFFSET = 4096
ISO_DESCRIPTOR_OFFSETS = (0x8001, 0x8801, 0x9001)
ISO_IDS = (b"CD001", b"BEA01", b"NSR02", b"NSR03", b"TEA01")
MBR_SIGNATURE_OFFSET = 510
GPT_SIGNATURE = b"EFI PART"
VHD_MAX_GEOMETRY = 65535 * 16 * 255
VHD_DISK_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}
# qemu trusts current_size instead of the CHS geometry for these creators.
VHD_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


class View:
    """Read-only access to the captured regions plus the tail of the data."""

    def __init__(
        self, regions: dict[int, bytes], tail: bytes, data_size: int, *, final: bool
    ) -> None:
        self.regions = regions
        self.tail = tail
        self.data_size = data_size
        self.final = final  # True at finish(): data_size is the whole data

    @property
    def head(self) -> bytes:
        return self.regions.get(0, b"")

    def read(self, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` if one captured region (or the tail) holds them."""
        if offset < 0 or length < 0:
            return None
        for start, data in self.regions.items():
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start : offset - start + length]
        tail_start = self.data_size - len(self.tail)
        if self.final and tail_start <= offset and offset + length <= self.data_size:
            return self.tail[offset - tail_start : offset - tail_start + length]
        return None


@dataclass(frozen=True)
class Request:
    """A region a probe wants: only honoured when ``offset >= after`` (the end of the
    region the request was derived from), so capture never depends on chunking."""

    offset: int
    length: int
    after: int


@dataclass
class Probe:
    format: str
    virtual_size: int | None = None
    cluster_size: int | None = None
    qcow2: Qcow2Header | None = None
    vmdk: VmdkInfo | None = None
    encrypted: bool = False
    encryption: str | None = None
    parent: str | None = None
    findings: list[Finding] = field(default_factory=list)


def _u32le(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def _u64le(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", b, off)[0])


def _u32be(b: bytes, off: int) -> int:
    return int(struct.unpack_from(">I", b, off)[0])


def _u64be(b: bytes, off: int) -> int:
    return int(struct.unpack_from(">Q", b, off)[0])


def _truncated(fmt: str, need: int, have: int) -> Finding:
    return Finding("truncated-header", f"{fmt} header needs {need} bytes, the data has {have}")


# --------------------------------------------------------------------------- qcow2 / qcow


def probe_qcow2(v: View) -> Probe | None:
    head = v.head
    if not qcow2.is_qcow2(head):
        return None
    p = Probe("qcow2")
    try:
        h = qcow2.parse_header(head, file_size=v.data_size if v.final else None)
    except ImageFormatError as exc:
        code = "truncated-header" if "truncated" in str(exc) else "invalid-header"
        p.findings.append(Finding(code, str(exc)))
        return p
    p.qcow2 = h
    p.virtual_size = h.virtual_size
    p.cluster_size = h.cluster_size
    if h.crypt_method or h.has_fde_extension:
        p.encrypted = True
        p.encryption = h.encryption or "luks"
    p.findings.extend(qcow2.layout_findings(h, v.data_size))
    return p


def probe_qcow1(v: View) -> Probe | None:
    head = v.head
    if len(head) < 8 or head[:4] != qcow2.MAGIC or _u32be(head, 4) != 1:
        return None
    p = Probe("qcow")
    if len(head) < 48:
        p.findings.append(_truncated("qcow", 48, len(head)))
        return p
    backing_off, backing_size = _u64be(head, 8), _u32be(head, 16)
    p.virtual_size = _u64be(head, 24)
    p.cluster_size = 1 << min(head[32], 63)
    crypt = _u32be(head, 36)
    if crypt:
        p.encrypted, p.encryption = True, "aes"
    if backing_off:
        p.parent = _name(v, backing_off, min(backing_size, 1023), "qcow", p)
    return p


def _name(v: View, off: int, size: int, fmt: str, p: Probe) -> str:
    if off + size > v.data_size:
        p.findings.append(
            Finding(
                "backing-file-name-past-end",
                f"{fmt} backing file name at offset {off} ({size} bytes) runs past the end of "
                f"the data ({v.data_size} bytes)",
            )
        )
    raw = v.read(off, size)
    return raw.decode("utf-8", errors="replace") if raw is not None else ""


# --------------------------------------------------------------------------- qed


def probe_qed(v: View) -> Probe | None:
    head = v.head
    if head[:4] != QED_MAGIC:
        return None
    p = Probe("qed")
    if len(head) < 64:
        p.findings.append(_truncated("qed", 64, len(head)))
        return p
    p.cluster_size = _u32le(head, 4)
    p.virtual_size = _u64le(head, 48)
    features = _u64le(head, 16)
    backing_off, backing_size = _u32le(head, 56), _u32le(head, 60)
    if features & 1 or backing_off:  # QED_F_BACKING_FILE
        p.parent = _name(v, backing_off, min(backing_size, 1023), "qed", p) if backing_off else ""
    return p


# --------------------------------------------------------------------------- vmdk

EXTENT_ACCESS = ("RW", "RDONLY", "NOACCESS")


@dataclass(frozen=True)
class Descriptor:
    create_type: str | None
    extents: tuple[tuple[str, int, str, str | None], ...]  # access, sectors, type, file
    parent_hint: str | None
    parent_cid: str | None


def _extent(line: str) -> tuple[str, int, str, str | None]:
    """``ACCESS SECTORS TYPE ["FILE" [OFFSET]]``; the file name is what lies between quotes."""
    head, _, rest = line.partition('"')
    words = head.split()
    sectors = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
    kind = words[2].upper() if len(words) > 2 else "UNKNOWN"
    name = rest.partition('"')[0] if rest else None
    return words[0], sectors, kind, name


def parse_descriptor(text: bytes) -> Descriptor:
    """Every key and every extent line of a VMDK descriptor, wherever it stands.

    Plain string operations only (no regular expressions): the text is hostile.
    """
    create_type = parent_hint = parent_cid = None
    extents: list[tuple[str, int, str, str | None]] = []
    for raw in text.split(b"\0", 1)[0].decode("utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split(None, 1)[0]
        if first in EXTENT_ACCESS:
            extents.append(_extent(line))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip().strip('"')
        if key == "createType":
            create_type = value
        elif key == "parentFileNameHint":
            parent_hint = value
        elif key == "parentCID":
            parent_cid = value
    # qemu finds these keys with strstr() anywhere in the text, comments included:
    # read them its way too, so that a comment cannot hide or change them.
    plain = text.split(b"\0", 1)[0]
    qemu_type = _qemu_value(plain, b"createType")
    if qemu_type is not None and qemu_type != create_type:
        create_type = f"{create_type} (qemu reads {qemu_type!r})"
    qemu_parent = _qemu_parent(plain)
    if qemu_parent is not None and parent_hint is None:
        parent_hint = qemu_parent
    return Descriptor(create_type, tuple(extents), parent_hint, parent_cid)


def _qemu_value(text: bytes, key: bytes) -> str | None:
    """``key`` as qemu's vmdk_parse_description finds it: first occurrence, skip 2 bytes
    (``="``), up to the next double quote."""
    pos = text.find(key)
    if pos < 0:
        return None
    start = pos + len(key) + 2
    end = text.find(b'"', start)
    if start > len(text) or end < 0:
        return None
    return text[start:end].decode("utf-8", errors="replace")


def _qemu_parent(text: bytes) -> str | None:
    """The parent name qemu's vmdk_parent_open would follow, if any."""
    pos = text.find(b"parentFileNameHint")
    if pos < 0:
        return None
    start = pos + len(b"parentFileNameHint") + 2
    end = text.find(b'"', start)
    return text[start : end if end >= 0 else len(text)].decode("utf-8", errors="replace")


def _vmdk_probe_from(desc: Descriptor, p: Probe, *, sparse: bool, embedded: bool) -> None:
    p.vmdk = VmdkInfo(
        create_type=desc.create_type,
        extents=tuple(e[3] or "" for e in desc.extents),
        sparse_header=sparse,
        descriptor_embedded=embedded,
        extent_types=tuple(e[2] for e in desc.extents),
    )
    if desc.parent_cid is not None and desc.parent_cid.lower() != "ffffffff":
        p.parent = desc.parent_hint or ""
    elif desc.parent_hint:
        p.parent = desc.parent_hint


def is_text_descriptor(head: bytes) -> bool:
    """A plain-text VMDK descriptor: a ``version=1|2|3`` line and a createType or header."""
    text = head[:4096].split(b"\0", 1)[0]
    if b"# Disk DescriptorFile" not in text and b"createType" not in text:
        return False
    for line in text.splitlines():
        key, sep, value = line.partition(b"=")
        if sep and key.strip() == b"version" and value.strip().strip(b'"') in (b"1", b"2", b"3"):
            return True
    return False


def vmdk_descriptor_request(v: View) -> Request | None:
    head = v.head
    if head[:4] != VMDK_SPARSE_MAGIC or len(head) < 44:
        return None
    off, size = _u64le(head, 28) * SECTOR, _u64le(head, 36) * SECTOR
    if not off or not size:
        return None
    return Request(off, min(size, MAX_REGION), HEAD_SIZE)


def probe_vmdk(v: View) -> Probe | None:
    head = v.head
    if head[:4] == VMDK_COWD_MAGIC:
        p = Probe("vmdk")
        p.vmdk = VmdkInfo("vmfsSparse", (), True, False)
        if len(head) >= 16:
            p.virtual_size = _u32le(head, 12) * SECTOR  # VMDK3 disk_sectors
        return p
    if head[:4] == VMDK_SPARSE_MAGIC:
        p = Probe("vmdk")
        if len(head) < 80:
            p.findings.append(_truncated("vmdk", 80, len(head)))
            return p
        capacity, grain = _u64le(head, 12), _u64le(head, 20)
        desc_sector, desc_sectors = _u64le(head, 28), _u64le(head, 36)
        if _u64le(head, 56) == VMDK_GD_AT_END:
            # streamOptimized with a footer: qemu takes the header from the footer.
            footer = v.read(v.data_size - 1024, 512) if v.data_size >= 1536 else None
            if footer is None or footer[:4] != VMDK_SPARSE_MAGIC:
                p.findings.append(
                    Finding("invalid-header", "vmdk grain directory at end but no valid footer")
                )
            else:
                capacity, grain = _u64le(footer, 12), _u64le(footer, 20)
        p.virtual_size = capacity * SECTOR
        p.cluster_size = grain * SECTOR
        if capacity == 0 and desc_sector:
            p.findings.append(
                Finding(
                    "vmdk-zero-capacity",
                    "vmdk sparse header with zero capacity: qemu would open the embedded "
                    "descriptor as a descriptor file and follow its extents",
                )
            )
        if desc_sectors and desc_sector != 1:
            p.findings.append(
                Finding(
                    "vmdk-descriptor-offset",
                    f"vmdk embedded descriptor at sector {desc_sector}, not 1: qemu reads the "
                    "descriptor at sector 1 for the parent, so the two could disagree",
                )
            )
        req = vmdk_descriptor_request(v)
        if req is None:
            _vmdk_probe_from(Descriptor(None, (), None, None), p, sparse=True, embedded=False)
            return p
        if req.offset + req.length > v.data_size and v.final:
            p.findings.append(
                Finding(
                    "descriptor-past-end",
                    f"vmdk descriptor at offset {req.offset} ({req.length} bytes) runs past the "
                    f"end of the data ({v.data_size} bytes)",
                )
            )
            text: bytes | None = b""
        else:
            text = v.read(req.offset, min(req.length, max(0, v.data_size - req.offset)))
        if text is None:
            text = b""
            p.findings.append(
                Finding("descriptor-unreadable", f"vmdk descriptor at offset {req.offset} unread")
            )
        _vmdk_probe_from(parse_descriptor(text), p, sparse=True, embedded=True)
        if p.parent is None:
            # qemu looks for the parent in the 10 KiB at sector 1, whatever the header says.
            near = v.read(SECTOR, max(0, min(VMDK_QEMU_DESC_SIZE, v.data_size - SECTOR)))
            hint = _qemu_parent(near.split(b"\0", 1)[0]) if near else None
            if hint is not None:
                p.parent = hint
        return p
    if is_text_descriptor(head):
        p = Probe("vmdk")
        desc = parse_descriptor(head[:MAX_REGION])
        _vmdk_probe_from(desc, p, sparse=False, embedded=False)
        p.virtual_size = sum(e[1] for e in desc.extents) * SECTOR
        return p
    return None


# --------------------------------------------------------------------------- vhd


def _vhd_footer_ok(f: bytes) -> bool:
    if len(f) < 512 or f[:8] != VHD_COOKIE:
        return False
    checksum = _u32be(f, 64)
    total = sum(f[:64]) + sum(f[68:512])
    return (~total & 0xFFFFFFFF) == checksum


def _vhd_footer(v: View) -> bytes | None:
    """The footer copy at offset 0 (dynamic disks), else a valid footer at the end (fixed)."""
    head = v.head
    if head[:8] == VHD_COOKIE and len(head) >= 512:
        return head[:512]
    if v.final and v.data_size >= 512:
        tail = v.read(v.data_size - 512, 512)
        if tail is not None and _vhd_footer_ok(tail):
            return tail
    return None


def probe_vhd(v: View) -> Probe | None:
    head = v.head
    if head[:8] == VHD_COOKIE and len(head) < 512:
        p = Probe("vhd")
        p.findings.append(_truncated("vhd", 512, len(head)))
        return p
    footer = _vhd_footer(v)
    if footer is None:
        return None
    p = Probe("vhd")
    cyls, heads, secs = struct.unpack_from(">HBB", footer, 56)
    sectors = cyls * heads * secs
    creator = footer[28:32]
    if creator in VHD_SIZE_CREATORS or sectors == VHD_MAX_GEOMETRY:
        sectors = _u64be(footer, 48) // SECTOR
    p.virtual_size = sectors * SECTOR
    disk_type = _u32be(footer, 60)
    if disk_type in (3, 4):
        dyn_off = _u64be(footer, 16)
        dyn = v.read(dyn_off, 1024) if dyn_off < (1 << 62) else None
        if dyn is not None and dyn[:8] == VHD_DYNAMIC_COOKIE:
            p.cluster_size = _u32be(dyn, 32)  # block size, qemu's "cluster-size"
        if disk_type == 4:
            p.parent = ""
            if dyn is not None and dyn[:8] == VHD_DYNAMIC_COOKIE:
                p.parent = dyn[64:576].decode("utf-16-be", errors="replace").rstrip("\0")
    elif disk_type not in VHD_DISK_TYPES:
        p.findings.append(Finding("invalid-header", f"vhd disk type {disk_type} is unknown"))
    return p


# --------------------------------------------------------------------------- vhdx


def _vhdx_metadata_region(v: View) -> tuple[int, int] | None:
    table = v.read(VHDX_REGION_TABLE, 16)
    if table is None or table[:4] != VHDX_REGION_SIGNATURE:
        return None
    count = min(_u32le(table, 8), 2047)
    entries = v.read(VHDX_REGION_TABLE + 16, count * 32)
    if entries is None:
        return None
    for i in range(count):
        e = entries[i * 32 : i * 32 + 32]
        if e[:16] == VHDX_METADATA_REGION:
            return _u64le(e, 16), _u32le(e, 24)
    return None


def _vhdx_items(v: View, meta_off: int) -> list[tuple[bytes, int, int]] | None:
    table = v.read(meta_off, 32)
    if table is None or table[:8] != VHDX_METADATA_SIGNATURE:
        return None
    count = min(struct.unpack_from("<H", table, 10)[0], (MAX_REGION - 32) // 32)
    entries = v.read(meta_off + 32, count * 32)
    if entries is None:
        return None
    out = []
    for i in range(count):
        e = entries[i * 32 : i * 32 + 32]
        out.append((e[:16], _u32le(e, 16), _u32le(e, 20)))
    return out


def vhdx_requests(v: View) -> list[Request]:
    if v.head[:8] != VHDX_SIGNATURE:
        return []
    region = _vhdx_metadata_region(v)
    if region is None:
        return []
    meta_off, meta_len = region
    out = [Request(meta_off, min(meta_len, MAX_REGION), HEAD_SIZE)]
    items = _vhdx_items(v, meta_off)
    if items:
        for guid, off, length in items:
            if guid in (VHDX_VIRTUAL_DISK_SIZE, VHDX_FILE_PARAMETERS):
                after = meta_off + min(meta_len, MAX_REGION)
                out.append(Request(meta_off + off, min(length, MAX_ITEM), after))
    return out


def probe_vhdx(v: View) -> Probe | None:
    if v.head[:8] != VHDX_SIGNATURE:
        return None
    p = Probe("vhdx")
    region = _vhdx_metadata_region(v)
    items = _vhdx_items(v, region[0]) if region else None
    if region is None or items is None:
        p.findings.append(
            Finding("invalid-header", "vhdx region table or metadata table missing or unreadable")
        )
        return p
    meta_off = region[0]
    for guid, off, length in items:
        if guid == VHDX_VIRTUAL_DISK_SIZE and length >= 8:
            raw = v.read(meta_off + off, 8)
            if raw is not None:
                p.virtual_size = _u64le(raw, 0)
        elif guid == VHDX_FILE_PARAMETERS and length >= 8:
            raw = v.read(meta_off + off, 8)
            if raw is not None:
                p.cluster_size = _u32le(raw, 0)  # block size, qemu's "cluster-size"
        elif guid == VHDX_PARENT_LOCATOR:
            p.parent = ""
    if p.virtual_size is None:
        p.findings.append(Finding("invalid-header", "vhdx virtual disk size item unreadable"))
    return p


# --------------------------------------------------------------------------- vdi


def probe_vdi(v: View) -> Probe | None:
    head = v.head
    if len(head) < VDI_SIGNATURE_OFFSET + 4 or _u32le(head, VDI_SIGNATURE_OFFSET) != VDI_SIGNATURE:
        return None
    p = Probe("vdi")
    if len(head) < VDI_DISK_SIZE_OFFSET + 12:
        p.findings.append(_truncated("vdi", VDI_DISK_SIZE_OFFSET + 12, len(head)))
        return p
    p.virtual_size = _u64le(head, VDI_DISK_SIZE_OFFSET)
    p.cluster_size = _u32le(head, VDI_DISK_SIZE_OFFSET + 8)
    image_type = _u32le(head, VDI_IMAGE_TYPE_OFFSET)
    if image_type == 4:  # differencing
        p.parent = ""
    return p


# --------------------------------------------------------------------------- luks


def probe_luks(v: View) -> Probe | None:
    head = v.head
    if head[:6] != LUKS_MAGIC:
        return None
    p = Probe("luks", encrypted=True)
    if len(head) < 108:
        p.findings.append(_truncated("luks", 108, len(head)))
        p.encryption = "luks"
        return p
    version = struct.unpack_from(">H", head, 6)[0]
    p.encryption = f"luks{version}"
    payload = 0
    if version == 1:
        payload = _u32be(head, 104) * SECTOR
    elif version == 2:
        hdr_size = _u64be(head, 8)
        area = head[LUKS2_JSON_OFFSET : min(hdr_size, len(head))]
        try:
            meta = json.loads(area.split(b"\0", 1)[0].decode("utf-8"))
            seg = meta["segments"]["0"]
            payload = int(seg["offset"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            p.findings.append(Finding("invalid-header", "luks2 JSON metadata unreadable"))
    p.virtual_size = max(0, v.data_size - payload)
    return p


# --------------------------------------------------------------------------- iso / tables


def probe_iso(v: View) -> Probe | None:
    head = v.head
    for off in ISO_DESCRIPTOR_OFFSETS:
        if head[off : off + 5] in ISO_IDS:
            return Probe("iso", virtual_size=v.data_size)
    return None


def partition_table(head: bytes) -> str | None:
    if head[512:520] == GPT_SIGNATURE or head[4096:4104] == GPT_SIGNATURE:
        return "gpt"
    if len(head) >= 512 and head[MBR_SIGNATURE_OFFSET:512] == b"\x55\xaa":
        entries = head[446:510]
        if all(entries[i] in (0, 0x80) for i in range(0, 64, 16)):
            return "mbr"
    return None


# Detection order: the first match names the format when several match (a polyglot,
# which the policy refuses anyway).
PROBES: tuple[Callable[[View], Probe | None], ...] = (
    probe_qcow2,
    probe_qcow1,
    probe_qed,
    probe_vmdk,
    probe_vhdx,
    probe_vdi,
    probe_luks,
    probe_vhd,
    probe_iso,
)


def plan(v: View) -> list[Request]:
    """Regions beyond the head that the probes need, given what is captured so far."""
    out: list[Request] = []
    req = vmdk_descriptor_request(v)
    if req is not None:
        out.append(req)
    out.extend(vhdx_requests(v))
    return out
