"""The safety policy: one place that decides whether an inspected image may be used.

Called by the image service on upload and by the node cache on fetch.
(Interface fixed here; the implementation is filled in by the formats work.)
"""

from __future__ import annotations

from dataclasses import dataclass

from cowfleet.config import DEFAULT_MAX_VIRTUAL_SIZE
from cowfleet.formats.inspection import GLANCE_DISK_FORMATS, Inspection


@dataclass(frozen=True)
class Failure:
    code: str  # stable name, e.g. "backing-file", "data-file", "format-mismatch"
    message: str  # sentence naming the problem and the values involved


@dataclass(frozen=True)
class Verdict:
    declared_format: str
    detected_format: str
    failures: tuple[Failure, ...]

    @property
    def safe(self) -> bool:
        return not self.failures

    def raise_if_unsafe(self, **context: object) -> None:
        """Raise :class:`~cowfleet.errors.UnsafeImageError` naming every failure."""
        from cowfleet.errors import UnsafeImageError

        if self.failures:
            names = "; ".join(f"{f.code}: {f.message}" for f in self.failures)
            raise UnsafeImageError(f"image refused: {names}", self.failures, **context)


# VMDK create types whose data lives inside the one file.
VMDK_ALLOWED_CREATE_TYPES = frozenset({"monolithicSparse", "streamOptimized"})
# Formats qemu can still open but cowfleet refuses outright.
UNSUPPORTED_FORMATS = frozenset({"qcow", "qed"})
# Formats that, declared as raw, are still raw bytes to qemu: an ISO is read as raw.
RAW_COMPATIBLE = frozenset({"raw", "iso"})

# Every failure code and what it means (docs/formats.md lists the same table).
FAILURE_CODES: dict[str, str] = {
    "unknown-disk-format": "the declared disk_format is not one cowfleet accepts",
    "format-mismatch": "the detected format differs from the declared one",
    "polyglot": "the data matches the signatures of more than one format",
    "unsupported-format": "qcow (v1) and QED images are refused",
    "backing-file": "the image names a backing (parent) file",
    "json-filename": "a backing or data file name is a json: pseudo-protocol spec",
    "data-file": "the qcow2 image keeps its data in an external file",
    "data-file-extension": "a qcow2 external-data-file extension is present (feature bit clear)",
    "encrypted": "the image is encrypted (qcow2 AES/LUKS, LUKS)",
    "unknown-incompatible-features": "qcow2 incompatible feature bits cowfleet does not know",
    "corrupt": "the qcow2 corrupt bit is set",
    "vmdk-create-type": "a VMDK create type other than monolithicSparse/streamOptimized",
    "vmdk-extent": "a VMDK descriptor line names an extent file",
    "vmdk-descriptor-file": "a plain-text VMDK descriptor file (it only references extent files)",
    "virtual-size-too-large": "the virtual size is above the configured cap",
    "incomplete": "the data ended before the inspector saw every region it needs",
    "empty": "the image has no data",
    # Structural findings of the inspector, reported under their own codes.
    "truncated-header": "the data ends inside the format's header",
    "invalid-header": "the header holds values the format does not allow",
    "l1-table-past-end": "the qcow2 L1 table lies (partly) past the end of the data",
    "l1-table-too-small": "the qcow2 L1 table cannot map the declared virtual size",
    "l1-table-too-large": "the qcow2 L1 table is larger than qemu accepts (32 MiB)",
    "refcount-table-past-end": "the qcow2 refcount table lies past the end of the data",
    "refcount-table-too-large": "the qcow2 refcount table is larger than qemu accepts (8 MiB)",
    "snapshots-past-end": "the qcow2 snapshot table lies past the end of the data",
    "table-unaligned": "a qcow2 table offset is not aligned to the cluster size",
    "backing-file-name-past-end": "the backing file name lies past the end of the data",
    # On-disk checks of the qcow2 tables' entries (cowfleet.formats.qcow2_tables).
    "l2-table-past-end": "a qcow2 L1 entry names an L2 table past the end of the file",
    "refcount-block-past-end": "a qcow2 refcount table entry names a block past the file end",
    "data-cluster-past-end": "a qcow2 L2 entry names a data cluster past the end of the file",
    "compressed-cluster-past-end": "a qcow2 compressed cluster runs past the end of the file",
    "table-entry-reserved-bits": "a qcow2 L1, L2 or refcount table entry sets reserved bits",
    "metadata-overlap": "a qcow2 table or cluster lands on the header or other qcow2 metadata",
    "descriptor-past-end": "the VMDK embedded descriptor lies past the end of the data",
    "descriptor-unreadable": "the VMDK embedded descriptor could not be read",
    "vmdk-zero-capacity": "a VMDK sparse header of capacity 0 (qemu would follow its descriptor)",
    "vmdk-descriptor-offset": "a VMDK embedded descriptor not at sector 1 (qemu reads sector 1)",
}


def _fail(out: list[Failure], code: str, message: str) -> None:
    out.append(Failure(code, message))


def check(
    declared_format: str,
    inspection: Inspection,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> Verdict:
    """Judge ``inspection`` against ``declared_format`` (a Glance disk_format name).

    Every reason to refuse is collected (not just the first), each with a stable code
    from :data:`FAILURE_CODES` or an inspector finding code (``l1-table-past-end`` ...).
    """
    insp = inspection
    out: list[Failure] = []
    detected = insp.format
    expected = GLANCE_DISK_FORMATS.get(declared_format)
    if expected is None:
        _fail(
            out,
            "unknown-disk-format",
            f"declared disk format {declared_format!r} is not one of "
            f"{', '.join(sorted(GLANCE_DISK_FORMATS))}",
        )
    elif detected != expected and not (expected == "raw" and detected in RAW_COMPATIBLE):
        _fail(
            out,
            "format-mismatch",
            f"declared {declared_format!r} but the data is {detected!r}",
        )
    if len(insp.matches) > 1:
        _fail(
            out,
            "polyglot",
            f"the data matches several formats: {', '.join(insp.matches)}",
        )
    if detected in UNSUPPORTED_FORMATS:
        _fail(out, "unsupported-format", f"{detected} images are not accepted")

    _check_references(out, insp)

    if insp.encrypted or detected == "luks":
        how = insp.encryption or (insp.qcow2.encryption if insp.qcow2 else None) or "unknown"
        _fail(out, "encrypted", f"the {detected} image is encrypted ({how})")

    h = insp.qcow2
    if h is not None:
        if h.unknown_incompatible:
            _fail(
                out,
                "unknown-incompatible-features",
                f"qcow2 incompatible feature bits 0x{h.unknown_incompatible:x} are unknown",
            )
        if h.corrupt:
            _fail(out, "corrupt", "the qcow2 corrupt bit is set")

    if insp.vmdk is not None:
        _check_vmdk(out, insp)

    if insp.virtual_size > max_virtual_size:
        _fail(
            out,
            "virtual-size-too-large",
            f"virtual size {insp.virtual_size} bytes is above the cap of {max_virtual_size}",
        )
    for finding in insp.findings:
        _fail(out, finding.code, finding.message)
    if not insp.complete:
        _fail(
            out,
            "incomplete",
            f"the data ({insp.data_size} bytes) ended before every region the "
            "inspector needs was seen",
        )
    return Verdict(declared_format, detected, tuple(out))


def _check_references(out: list[Failure], insp: Inspection) -> None:
    h = insp.qcow2
    names: list[tuple[str, str]] = []
    if h is not None and h.has_backing:
        name = h.backing_file if h.backing_file is not None else "(name unreadable)"
        _fail(out, "backing-file", f"the qcow2 image has a backing file {name!r}")
        names.append(("backing file", name))
    elif insp.parent is not None:
        shown = insp.parent or "(unnamed)"
        _fail(out, "backing-file", f"the {insp.format} image has a parent file {shown!r}")
        names.append(("parent file", insp.parent))
    if h is not None:
        if h.has_data_file_bit:
            _fail(
                out,
                "data-file",
                f"the qcow2 image uses an external data file {h.data_file or '(unnamed)'!r}",
            )
        elif h.data_file is not None:
            _fail(
                out,
                "data-file-extension",
                f"the qcow2 image carries an external data file extension {h.data_file!r} "
                "although the data-file feature bit is clear",
            )
        if h.data_file is not None:
            names.append(("data file", h.data_file))
    for what, name in names:
        if name.lstrip().startswith("json:"):
            _fail(out, "json-filename", f"the {what} name is a json: specification: {name!r}")


def _check_vmdk(out: list[Failure], insp: Inspection) -> None:
    v = insp.vmdk
    assert v is not None
    if v.create_type not in VMDK_ALLOWED_CREATE_TYPES:
        _fail(
            out,
            "vmdk-create-type",
            f"vmdk create type {v.create_type!r} is not monolithicSparse or streamOptimized",
        )
    # A sparse file's embedded descriptor names the file itself in its one SPARSE
    # extent line; any other extent line (anywhere in the descriptor) names a file.
    if not v.sparse_header:
        _fail(
            out,
            "vmdk-descriptor-file",
            "a plain-text vmdk descriptor holds no data of its own: it only names extent files",
        )
    lines = list(zip(v.extent_types or ("",) * len(v.extents), v.extents, strict=False))
    if v.sparse_header and v.descriptor_embedded and lines and lines[0][0] == "SPARSE":
        own = lines[0][1]
        lines = lines[1:]
        if any(c in own for c in "/\\") or own.lstrip().startswith("json:"):
            _fail(
                out,
                "vmdk-extent",
                f"the vmdk sparse extent names a path, not the image itself: {own!r}",
            )
    extra = [name for kind, name in lines if name or kind != "ZERO"]
    if extra:
        named = ", ".join(repr(n or "(unnamed)") for n in extra)
        _fail(
            out,
            "vmdk-extent",
            f"the vmdk descriptor names {len(extra)} extent file(s) besides the image "
            f"itself: {named}",
        )
