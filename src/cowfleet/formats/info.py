"""``disk info``: what ``qemu-img info [--backing-chain]`` reports, without qemu-img.

The top image's format is detected by the inspector; every lower layer of a
backing chain is read as the format its child recorded (never probed), as qemu
does when a backing format is pinned. Relative backing names are resolved against
the directory of the image that names them, the way qemu combines paths.
"""

from __future__ import annotations

import copy
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowfleet.errors import ImageFormatError, LocalIOError, MissingFileError
from cowfleet.formats.inspection import Inspection, Qcow2Header, qemu_format_name
from cowfleet.formats.inspector import inspect_path

Inspect = Callable[[Path], Inspection]

SECTOR = 512
MAX_CHAIN_DEPTH = 256

# Inspector formats qemu has no driver for: qemu reads those files as raw.
_AS_RAW = {"iso"}


@dataclass(frozen=True)
class DiskInfo:
    """One image as ``qemu-img info`` describes it (qemu's names via :meth:`to_qemu_json`)."""

    filename: str
    format: str  # qemu's driver name: raw, qcow2, vmdk, vpc, vhdx, vdi, ...
    virtual_size: int
    actual_size: int  # st_blocks * 512, as qemu reports it
    cluster_size: int | None = None
    dirty_flag: bool = False
    encrypted: bool = False
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_filename_format: str | None = None
    format_specific: Mapping[str, Any] | None = None  # {"type": ..., "data": {...}}

    def to_qemu_json(self) -> dict[str, Any]:
        """The object ``qemu-img info --output=json`` prints for this image."""
        out: dict[str, Any] = {
            "filename": self.filename,
            "format": self.format,
            "virtual-size": self.virtual_size,
            "actual-size": self.actual_size,
        }
        if self.encrypted:
            out["encrypted"] = True
        if self.cluster_size is not None:
            out["cluster-size"] = self.cluster_size
        if self.backing_filename is not None:
            out["backing-filename"] = self.backing_filename
            out["full-backing-filename"] = self.full_backing_filename
        if self.backing_filename_format is not None:
            out["backing-filename-format"] = self.backing_filename_format
        if self.format_specific is not None:
            out["format-specific"] = copy.deepcopy(dict(self.format_specific))
        out["dirty-flag"] = self.dirty_flag
        return out

    def render(self) -> str:
        """Human text in the shape of ``qemu-img info`` (7.2)."""
        lines = [
            f"image: {self.filename}",
            f"file format: {self.format}",
            f"virtual size: {size_to_str(self.virtual_size)} ({self.virtual_size} bytes)",
            f"disk size: {size_to_str(self.actual_size)}",
        ]
        if self.encrypted:
            lines.append("encrypted: yes")
        if self.cluster_size is not None:
            lines.append(f"cluster_size: {self.cluster_size}")
        if self.dirty_flag:
            lines.append("cleanly shut down: no")
        if self.backing_filename is not None:
            line = f"backing file: {self.backing_filename}"
            if self.full_backing_filename != self.backing_filename:
                line += f" (actual path: {self.full_backing_filename})"
            lines.append(line)
        if self.backing_filename_format is not None:
            lines.append(f"backing file format: {self.backing_filename_format}")
        if self.format_specific is not None:
            lines.append("Format specific information:")
            _render_dict(self.format_specific["data"], 4, lines)
        return "\n".join(lines) + "\n"


def _render_dict(data: Mapping[str, Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for key, value in data.items():
        name = key.replace("-", " ")
        if isinstance(value, Mapping):
            lines.append(f"{pad}{name}:")
            _render_dict(value, indent + 4, lines)
        elif isinstance(value, list):
            lines.append(f"{pad}{name}:")
            for i, item in enumerate(value):
                lines.append(f"{pad}    [{i}]:")
                if isinstance(item, Mapping):
                    _render_dict(item, indent + 8, lines)
                else:
                    lines.append(f"{pad}        {_human_value(item)}")
        else:
            lines.append(f"{pad}{name}: {_human_value(value)}")


def _human_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def size_to_str(n: int) -> str:
    """qemu's human size: three significant digits and a binary unit ("196 KiB", "20 GiB")."""
    units = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    if n <= 0:
        return f"{n} B" if n < 0 else "0 B"
    # The unit switches once the value reaches 1000 of the smaller unit.
    _, exp = math.frexp(n / (1000.0 / 1024.0))
    i = min((exp - 1) // 10, len(units) - 1)
    return f"{n / (1 << (i * 10)):0.3g} {units[i]}B"


def _default_inspect(path: Path) -> Inspection:
    return inspect_path(path, strict=False)  # a file the user names, and its chain


def full_backing_name(image: str, backing: str) -> str:
    """Resolve ``backing`` as qemu does: relative names are relative to the image's directory.

    Like qemu, the result is a plain join (``sub/../base.raw``), not normalized.
    """
    if backing.startswith("/"):
        return backing
    head = os.path.dirname(image)
    if not head:
        return backing
    return head + ("" if head.endswith("/") else "/") + backing


def _qcow2_specific(h: Qcow2Header) -> dict[str, Any]:
    data: dict[str, Any] = {"compat": h.compat, "compression-type": h.compression_type}
    if h.version >= 3:
        data["lazy-refcounts"] = h.lazy_refcounts
    data["refcount-bits"] = h.refcount_bits
    if h.version >= 3:
        data["corrupt"] = h.corrupt
        if h.data_file is not None:
            data["data-file"] = h.data_file
            data["data-file-raw"] = bool(h.autoclear_features & h.AUTOCLEAR_DATA_FILE_RAW)
        data["extended-l2"] = h.extended_l2
    return {"type": "qcow2", "data": data}


def disk_info(
    path: Path | str, *, fmt: str | None = None, inspect: Inspect | None = None
) -> DiskInfo:
    """Describe the image at ``path`` like ``qemu-img info``.

    ``fmt`` (a qemu driver name) reads the file as that format instead of detecting
    it; ``raw`` is then never inspected. A file whose content is not ``fmt`` raises
    :class:`ImageFormatError`, as qemu refuses to open it.
    """
    filename = str(path)
    p = Path(filename)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MissingFileError(f"image not found: {filename}", path=filename) from None
    except (OSError, ValueError) as exc:
        raise LocalIOError(f"cannot read {filename}: {exc}", path=filename) from exc
    actual_size = st.st_blocks * 512
    if fmt == "raw":
        return _raw_info(filename, p, st.st_size, actual_size)
    inspection = (inspect or _default_inspect)(p)
    detected = qemu_format_name(inspection.format)
    if detected in _AS_RAW:
        detected = "raw"
    if fmt is not None and qemu_format_name(fmt) != detected:
        raise ImageFormatError(
            f"{filename} is not in {fmt} format (its content is {detected})", path=filename
        )
    if detected == "raw":
        return _raw_info(filename, p, inspection.data_size or st.st_size, actual_size)
    if detected == "qcow2":
        h = inspection.qcow2
        if h is None:
            raise ImageFormatError(f"{filename}: qcow2 header could not be read", path=filename)
        backing = h.backing_file
        return DiskInfo(
            filename=filename,
            format="qcow2",
            virtual_size=h.virtual_size,
            actual_size=actual_size,
            cluster_size=h.cluster_size,
            dirty_flag=h.dirty,
            encrypted=h.crypt_method != 0,
            backing_filename=backing,
            full_backing_filename=full_backing_name(filename, backing) if backing else None,
            backing_filename_format=h.backing_format if backing else None,
            format_specific=_qcow2_specific(h),
        )
    cluster_size = inspection.cluster_size
    specific = None
    if detected == "vmdk" and inspection.vmdk is not None and inspection.vmdk.sparse_header:
        try:
            specific = _vmdk_specific(p, filename, inspection)
        except OSError as exc:
            raise LocalIOError(f"cannot read {filename}: {exc.strerror}", path=filename) from exc
    return DiskInfo(
        filename=filename,
        format=detected,
        virtual_size=inspection.virtual_size,
        actual_size=actual_size,
        cluster_size=cluster_size,
        encrypted=inspection.encrypted,
        format_specific=specific,
    )


def _pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


_VMDK_MAGIC = b"KDMV"
_VMDK_COMPRESSION_DEFLATE = 1
_MAX_DESCRIPTOR = 64 * 1024


def _vmdk_specific(path: Path, filename: str, inspection: Inspection) -> dict[str, Any] | None:
    """qemu's vmdk block for a monolithic sparse or streamOptimized file (embedded descriptor)."""
    head = _pread(path, 0, 512)
    if len(head) < 80 or head[:4] != _VMDK_MAGIC:
        return None
    capacity, grain, desc_off, desc_size = struct.unpack_from("<QQQQ", head, 12)
    compress = struct.unpack_from("<H", head, 77)[0]
    if not desc_off or not desc_size or desc_off >= 1 << 40:
        return None
    text = _pread(path, desc_off * SECTOR, min(desc_size * SECTOR, _MAX_DESCRIPTOR))
    fields: dict[str, str] = {}
    for raw in text.split(b"\n"):
        line = raw.split(b"\0", 1)[0].strip().decode("utf-8", errors="replace")
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            fields[key.strip()] = value.strip().strip('"')
    try:
        cid = int(fields["CID"], 16)
        parent_cid = int(fields["parentCID"], 16)
        create_type = fields["createType"]
    except (KeyError, ValueError):
        return None
    extent: dict[str, Any] = {}
    if compress == _VMDK_COMPRESSION_DEFLATE:
        extent["compressed"] = True
    extent.update(
        {
            # The inspector already resolved stream-optimized footers: prefer its values.
            "virtual-size": inspection.virtual_size or capacity * SECTOR,
            "filename": filename,
            "cluster-size": inspection.cluster_size or grain * SECTOR,
            "format": "",
        }
    )
    return {
        "type": "vmdk",
        "data": {
            "cid": cid,
            "parent-cid": parent_cid,
            "create-type": create_type,
            "extents": [extent],
        },
    }


def _raw_info(filename: str, p: Path, size: int, actual_size: int) -> DiskInfo:
    # qemu's raw driver reports the length rounded up to whole sectors.
    return DiskInfo(
        filename=filename,
        format="raw",
        virtual_size=-(-size // SECTOR) * SECTOR,
        actual_size=actual_size,
    )


def backing_chain(path: Path | str, *, inspect: Inspect | None = None) -> list[DiskInfo]:
    """Every layer from ``path`` down to the bottom, like ``qemu-img info --backing-chain``.

    Lower layers are read as their child's recorded backing format (never probed).
    Raises :class:`MissingFileError` for a missing backing file and
    :class:`ImageFormatError` for a loop, an unrecorded backing format, or a
    protocol-style backing name (``json:``, ``nbd:``...).
    """
    layers = [disk_info(path, inspect=inspect)]
    seen = {_identity(layers[0].filename)}
    while layers[-1].backing_filename is not None:
        child = layers[-1]
        name = child.full_backing_filename or ""
        if len(layers) >= MAX_CHAIN_DEPTH:
            raise ImageFormatError(f"backing chain of {path} is deeper than {MAX_CHAIN_DEPTH}")
        if _has_protocol(child.backing_filename or ""):
            raise ImageFormatError(
                f"{child.filename} names a protocol backing file {child.backing_filename!r}; "
                "refusing to follow it"
            )
        fmt = child.backing_filename_format
        if not fmt:
            raise ImageFormatError(
                f"{child.filename} does not record its backing file's format; refusing to probe it"
            )
        try:
            ident = _identity(name)
        except FileNotFoundError:
            raise MissingFileError(
                f"backing file {name} of {child.filename} not found", path=name
            ) from None
        except (OSError, ValueError) as exc:
            raise LocalIOError(f"cannot read backing file {name}: {exc}", path=name) from exc
        if ident in seen:
            raise ImageFormatError(f"backing chain loop: {child.filename} -> {name}")
        seen.add(ident)
        layers.append(disk_info(name, fmt=fmt, inspect=inspect))
    return layers


def _identity(name: str) -> tuple[int, int]:
    st = os.stat(name)
    return (st.st_dev, st.st_ino)


def _has_protocol(name: str) -> bool:
    """True for names qemu would treat as ``protocol:...`` rather than a file path."""
    head, sep, _ = name.partition(":")
    return bool(sep) and "/" not in head
