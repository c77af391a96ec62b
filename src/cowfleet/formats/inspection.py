"""Records produced by the format inspector (the interface other parts rely on).

The inspector (:mod:`cowfleet.formats.inspector`) is sans-I/O: it is fed
chunks and, at :meth:`finish`, returns one :class:`Inspection`. The safety
policy (:mod:`cowfleet.formats.policy`) turns an Inspection into a Verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Format names as cowfleet (and qemu-img) spell them. Glance's ``vhd`` is qemu's ``vpc``:
# the inspector reports "vhd"; :func:`qemu_format_name` maps to qemu's spelling.
FORMATS = ("raw", "qcow2", "qcow", "qed", "vmdk", "vhd", "vhdx", "vdi", "iso", "luks")

# Glance disk_format values and the inspector format each must be.
GLANCE_DISK_FORMATS: dict[str, str] = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vhd": "vhd",
    "vhdx": "vhdx",
    "vdi": "vdi",
    "iso": "iso",
    "aki": "raw",  # kernel image: plain bytes
    "ari": "raw",  # ramdisk image: plain bytes
    "ami": "raw",  # machine image: a raw disk
}


def qemu_format_name(fmt: str) -> str:
    """qemu-img's ``-f`` name for a cowfleet format name."""
    return {"vhd": "vpc"}.get(fmt, fmt)


@dataclass(frozen=True)
class Qcow2Header:
    """Every qcow2 header field that users and the safety policy need."""

    version: int
    cluster_bits: int
    cluster_size: int
    virtual_size: int
    crypt_method: int  # 0 none, 1 AES, 2 LUKS
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    backing_file_offset: int
    backing_file_size: int
    backing_file: str | None  # decoded name, None when absent
    backing_format: str | None  # from the backing-format header extension
    data_file: str | None  # from the external-data-file header extension
    compression_type: str  # "zlib" or "zstd" (or "unknown:<n>")
    extension_types: tuple[int, ...] = ()  # every header extension type, in file order
    feature_names: tuple[tuple[int, int, str], ...] = ()  # (kind, bit, name) from the table

    # Incompatible feature bits (qcow2.txt)
    INCOMPAT_DIRTY = 1 << 0
    INCOMPAT_CORRUPT = 1 << 1
    INCOMPAT_DATA_FILE = 1 << 2
    INCOMPAT_COMPRESSION = 1 << 3
    INCOMPAT_EXTL2 = 1 << 4
    INCOMPAT_KNOWN = 0b11111
    COMPAT_LAZY_REFCOUNTS = 1 << 0
    AUTOCLEAR_DATA_FILE_RAW = 1 << 1

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & self.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & self.INCOMPAT_CORRUPT)

    @property
    def has_data_file_bit(self) -> bool:
        return bool(self.incompatible_features & self.INCOMPAT_DATA_FILE)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & self.INCOMPAT_EXTL2)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & self.COMPAT_LAZY_REFCOUNTS)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def has_backing(self) -> bool:
        """A backing file is declared (even one whose name could not be read)."""
        return bool(self.backing_file_offset) or self.backing_file is not None

    @property
    def has_fde_extension(self) -> bool:
        return 0x0537BE77 in self.extension_types

    @property
    def has_bitmaps_extension(self) -> bool:
        return 0x23852875 in self.extension_types

    @property
    def unknown_incompatible(self) -> int:
        return self.incompatible_features & ~self.INCOMPAT_KNOWN

    @property
    def compat(self) -> str:
        """qemu-img's ``compat`` string: "0.10" for v2, "1.1" for v3."""
        return "0.10" if self.version == 2 else "1.1"

    @property
    def encryption(self) -> str | None:
        return {0: None, 1: "aes", 2: "luks"}.get(self.crypt_method, f"unknown:{self.crypt_method}")


@dataclass(frozen=True)
class VmdkInfo:
    create_type: str | None  # from the descriptor, e.g. "monolithicSparse"
    extents: tuple[str, ...]  # file name of every extent line, in order ("" when none)
    sparse_header: bool  # True when the file starts with the "KDMV" sparse header
    descriptor_embedded: bool
    extent_types: tuple[str, ...] = ()  # type of every extent line (SPARSE, FLAT, ZERO ...)


@dataclass(frozen=True)
class Finding:
    """A structural problem the inspector saw (e.g. a table past the end of data)."""

    code: str  # stable machine name, e.g. "offset-past-end", "truncated-header"
    message: str  # human sentence naming the field and values


@dataclass(frozen=True)
class Inspection:
    """What the inspector learned from a byte stream."""

    format: str  # one of FORMATS; "raw" when nothing else matched
    virtual_size: int  # bytes the guest sees (== data_size for raw)
    data_size: int  # bytes fed to the inspector
    matches: tuple[str, ...] = ()  # every non-raw format whose signature matched
    qcow2: Qcow2Header | None = None
    vmdk: VmdkInfo | None = None
    partition_table: str | None = None  # "gpt" or "mbr" when a raw image carries one
    cluster_size: int | None = None  # for formats that have one
    encrypted: bool = False
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    complete: bool = True  # False when fed fewer bytes than needed to decide
    # A parent/backing reference of a non-qcow2 format (qcow v1, qed, differencing vhd,
    # vhdx parent locator, vmdk parentFileNameHint): "" when declared but unnamed.
    parent: str | None = None
    encryption: str | None = None  # "aes", "luks", "luks1", "luks2" ... when encrypted

    @property
    def backing_file(self) -> str | None:
        if self.qcow2 is not None and self.qcow2.backing_file is not None:
            return self.qcow2.backing_file
        return self.parent
