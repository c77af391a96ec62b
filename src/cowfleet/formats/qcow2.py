"""Sans-I/O parsing of the qcow2 header (qemu ``docs/interop/qcow2.txt``).

:func:`parse_header` turns the first bytes of a file into a
:class:`~cowfleet.formats.inspection.Qcow2Header`; :func:`layout_findings` checks the
tables and offsets the header declares against the size of the data. Nothing here
allocates by a size the header declares: names and extensions are sliced out of the
given buffer, whose length the caller bounds.
"""

from __future__ import annotations

import struct

from cowfleet.errors import ImageFormatError
from cowfleet.formats.inspection import Finding, Qcow2Header

MAGIC = b"QFI\xfb"

# Header field offsets (big-endian), common to v2 and v3.
OFF_MAGIC = 0
OFF_VERSION = 4
OFF_BACKING_FILE_OFFSET = 8
OFF_BACKING_FILE_SIZE = 16
OFF_CLUSTER_BITS = 20
OFF_SIZE = 24
OFF_CRYPT_METHOD = 32
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_REFCOUNT_TABLE_CLUSTERS = 56
OFF_NB_SNAPSHOTS = 60
OFF_SNAPSHOTS_OFFSET = 64
# v3 only.
OFF_INCOMPATIBLE_FEATURES = 72
OFF_COMPATIBLE_FEATURES = 80
OFF_AUTOCLEAR_FEATURES = 88
OFF_REFCOUNT_ORDER = 96
OFF_HEADER_LENGTH = 100
OFF_COMPRESSION_TYPE = 104

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes every version has
_V3 = struct.Struct(">QQQII")  # bytes 72..103

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FULL_DISK_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441
KNOWN_EXTENSIONS = frozenset(
    {EXT_BACKING_FORMAT, EXT_FEATURE_NAMES, EXT_BITMAPS, EXT_FULL_DISK_ENCRYPTION, EXT_DATA_FILE}
)
_EXT_HEAD = struct.Struct(">II")
FEATURE_NAME_ENTRY = 48

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu refuses clusters above 2 MiB
MAX_BACKING_NAME = 1023
MAX_REFCOUNT_ORDER = 6
MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_EXTENSIONS = 256
MAX_SNAPSHOTS = 65536  # qemu's QCOW_MAX_SNAPSHOTS
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}


def is_qcow2(buf: bytes) -> bool:
    """True when ``buf`` starts with the qcow magic and a version of 2 or 3."""
    return (
        len(buf) >= 8
        and buf[:4] == MAGIC
        and struct.unpack_from(">I", buf, OFF_VERSION)[0] in (2, 3)
    )


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def parse_header(buf: bytes, *, file_size: int | None = None) -> Qcow2Header:
    """Parse a qcow2 header and its extensions from ``buf`` (the first bytes of the file).

    ``buf`` should hold the first cluster (or at least 64 KiB) when the file has that
    many bytes. ``file_size`` (when known) tells whether a region missing from ``buf``
    is missing from the file too. Raises :class:`ImageFormatError` when the bytes are
    not a qcow2 header qemu would accept.
    """
    buf = bytes(buf)
    if len(buf) < V2_HEADER_LENGTH:
        raise ImageFormatError(
            f"truncated qcow2 header: {len(buf)} bytes, need at least {V2_HEADER_LENGTH}"
        )
    (
        magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ImageFormatError("not a qcow2 image: bad magic")
    if version not in (2, 3):
        raise ImageFormatError(f"unsupported qcow2 version {version} (expected 2 or 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError(
            f"qcow2 cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        )
    cluster_size = 1 << cluster_bits

    if version == 2:
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = V2_HEADER_LENGTH
    else:
        if len(buf) < V3_MIN_HEADER_LENGTH:
            raise ImageFormatError(
                f"truncated qcow2 v3 header: {len(buf)} bytes, need {V3_MIN_HEADER_LENGTH}"
            )
        incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(
            buf, OFF_INCOMPATIBLE_FEATURES
        )
        if header_length < V3_MIN_HEADER_LENGTH or header_length > cluster_size:
            raise ImageFormatError(
                f"qcow2 header_length {header_length} outside {V3_MIN_HEADER_LENGTH}.."
                f"{cluster_size}"
            )
        if header_length % 8:
            raise ImageFormatError(f"qcow2 header_length {header_length} is not a multiple of 8")
        if header_length > len(buf):
            raise ImageFormatError(
                f"truncated qcow2 header: header_length {header_length}, have {len(buf)} bytes"
            )
        if refcount_order > MAX_REFCOUNT_ORDER:
            raise ImageFormatError(f"qcow2 refcount_order {refcount_order} above 6")

    compression = "zlib"
    if header_length > OFF_COMPRESSION_TYPE:
        ctype = buf[OFF_COMPRESSION_TYPE]
        compression = COMPRESSION_TYPES.get(ctype, f"unknown:{ctype}")

    # Header extensions: from the end of the header to the end-of-extensions marker,
    # within the first cluster (and before the backing file name when there is one).
    limit = cluster_size
    if backing_file_offset and backing_file_offset < limit:
        limit = int(backing_file_offset)
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: list[tuple[int, int, str]] = []
    ext_types: list[int] = []
    pos = header_length
    for _ in range(MAX_EXTENSIONS):
        if pos + _EXT_HEAD.size > limit:
            raise ImageFormatError(
                f"qcow2 header extensions run past offset {limit} without an end marker"
            )
        if pos + _EXT_HEAD.size > len(buf):
            _missing(pos + _EXT_HEAD.size, buf, file_size, "header extensions")
        ext_type, ext_len = _EXT_HEAD.unpack_from(buf, pos)
        if ext_type == EXT_END:
            break
        data_start = pos + _EXT_HEAD.size
        data_end = data_start + ext_len
        if data_end > limit:
            raise ImageFormatError(
                f"qcow2 header extension 0x{ext_type:08x} of {ext_len} bytes runs past "
                f"offset {limit}"
            )
        if data_end > len(buf):
            _missing(data_end, buf, file_size, f"header extension 0x{ext_type:08x}")
        data = buf[data_start:data_end]
        ext_types.append(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = _text(data.rstrip(b"\0"))
        elif ext_type == EXT_DATA_FILE:
            data_file = _text(data.rstrip(b"\0"))
        elif ext_type == EXT_FEATURE_NAMES:
            for i in range(0, ext_len - FEATURE_NAME_ENTRY + 1, FEATURE_NAME_ENTRY):
                kind, bit = data[i], data[i + 1]
                name = _text(data[i + 2 : i + FEATURE_NAME_ENTRY].split(b"\0", 1)[0])
                feature_names.append((kind, bit, name))
        pos = data_start + ((ext_len + 7) & ~7)
    else:
        raise ImageFormatError(f"more than {MAX_EXTENSIONS} qcow2 header extensions")

    backing_file: str | None = None
    if backing_file_offset:
        if backing_file_size > MAX_BACKING_NAME:
            raise ImageFormatError(
                f"qcow2 backing file name of {backing_file_size} bytes is longer than "
                f"{MAX_BACKING_NAME}"
            )
        end = backing_file_offset + backing_file_size
        if end <= len(buf):
            backing_file = _text(buf[backing_file_offset:end])
        # else: the name lies outside the given bytes; backing_file_offset still says
        # there is one, and layout_findings reports a name past the end of the data.

    return Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        cluster_size=cluster_size,
        virtual_size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        backing_file=backing_file,
        backing_format=backing_format,
        data_file=data_file,
        compression_type=compression,
        extension_types=tuple(ext_types),
        feature_names=tuple(feature_names),
    )


def _missing(end: int, buf: bytes, file_size: int | None, what: str) -> None:
    if file_size is not None and end > file_size:
        raise ImageFormatError(f"qcow2 {what} run past the end of the file ({file_size} bytes)")
    raise ImageFormatError(f"qcow2 {what} lie beyond the first {len(buf)} bytes read")


def layout_findings(h: Qcow2Header, data_size: int) -> list[Finding]:
    """Structural problems of ``h`` given ``data_size`` bytes of file (tables past end...)."""
    out: list[Finding] = []
    cs = h.cluster_size

    def past_end(code: str, what: str, offset: int, length: int) -> None:
        if offset + length > data_size:
            out.append(
                Finding(
                    code,
                    f"qcow2 {what} at offset {offset} ({length} bytes) runs past the end "
                    f"of the data ({data_size} bytes)",
                )
            )

    def unaligned(what: str, offset: int) -> None:
        if offset % cs:
            out.append(
                Finding(
                    "table-unaligned",
                    f"qcow2 {what} offset {offset} is not aligned to the cluster size {cs}",
                )
            )

    if h.compression_type not in COMPRESSION_TYPES.values():
        out.append(Finding("invalid-header", f"qcow2 compression type {h.compression_type}"))
    elif (h.compression_type != "zlib") != bool(h.incompatible_features & h.INCOMPAT_COMPRESSION):
        out.append(
            Finding(
                "invalid-header",
                f"qcow2 compression type {h.compression_type} disagrees with the "
                "compression-type feature bit",
            )
        )
    if h.nb_snapshots > MAX_SNAPSHOTS:
        out.append(Finding("invalid-header", f"qcow2 image claims {h.nb_snapshots} snapshots"))
    if h.l1_size * 8 > MAX_L1_BYTES:
        out.append(Finding("l1-table-too-large", f"qcow2 L1 table of {h.l1_size} entries"))
    l2_entries = cs // (16 if h.extended_l2 else 8)
    needed = -(-h.virtual_size // (cs * l2_entries))
    if h.l1_size < needed:
        out.append(
            Finding(
                "l1-table-too-small",
                f"qcow2 L1 table of {h.l1_size} entries cannot map a virtual size of "
                f"{h.virtual_size} bytes ({needed} needed)",
            )
        )
    if h.l1_size:
        unaligned("L1 table", h.l1_table_offset)
        past_end("l1-table-past-end", "L1 table", h.l1_table_offset, h.l1_size * 8)
    reftable_bytes = h.refcount_table_clusters * cs
    if reftable_bytes > MAX_REFTABLE_BYTES:
        out.append(
            Finding(
                "refcount-table-too-large",
                f"qcow2 refcount table of {h.refcount_table_clusters} clusters",
            )
        )
    unaligned("refcount table", h.refcount_table_offset)
    past_end("refcount-table-past-end", "refcount table", h.refcount_table_offset, reftable_bytes)
    if h.nb_snapshots:
        unaligned("snapshot table", h.snapshots_offset)
        # Each snapshot header is at least 40 bytes.
        past_end("snapshots-past-end", "snapshot table", h.snapshots_offset, h.nb_snapshots * 40)
    if h.backing_file_offset:
        past_end(
            "backing-file-name-past-end",
            "backing file name",
            h.backing_file_offset,
            h.backing_file_size,
        )
    return out
