"""libvirt domain XML, built from data with :mod:`xml.etree` and parsed back.

Decisions (see docs/instances.md):
- Every disk is ``<driver name="qemu" type="qcow2"/>`` and carries its whole
  ``<backingStore>`` chain with an explicit ``<format>``, ended by an empty
  ``<backingStore/>``: libvirt never probes a format.
- Shared bases are marked ``<seclabel model="dac" relabel="no"/>`` so libvirt's
  dynamic ownership never chowns them (it did leave a shared base owned by
  ``libvirt-qemu``); bases are 0444 and readable by the qemu user instead.
  The instance's own files (overlays, kernel/ramdisk copies, console.log) are
  relabelled by libvirt as usual and restored when the domain stops.
- ``<metadata>`` records the cowfleet instances path, so a domain whose
  folder is gone is reported as an orphan by the node that made it, and
  domains of other tools are left alone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from cowfleet.errors import ValidationError

METADATA_NS = "https://cowfleet.invalid/xmlns/instance/1"
_PREFIX = "cowfleet"
ET.register_namespace(_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class BackingSpec:
    """One file below an overlay in its chain."""

    path: Path
    format: str
    shared: bool = True  # a shared base: never relabelled by libvirt


@dataclass(frozen=True)
class DiskSpec:
    target: str  # vda, vdb, vdc
    path: Path
    format: str = "qcow2"
    backing: tuple[BackingSpec, ...] = ()  # nearest first


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    virt_type: str  # kvm | qemu
    memory_mb: int
    vcpus: int
    disks: tuple[DiskSpec, ...]
    console_log: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    instances_path: Path | None = None
    image_id: str | None = None
    flavor: str | None = None


@dataclass(frozen=True)
class DiskTarget:
    """A row of ``virsh domblklist``."""

    target: str
    source: str


@dataclass(frozen=True)
class DomainMetadata:
    """What cowfleet wrote into ``<metadata>`` (None when the domain is not cowfleet's)."""

    instances_path: str | None
    image_id: str | None
    flavor: str | None


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _backing_chain(parent: ET.Element, chain: tuple[BackingSpec, ...]) -> None:
    node = parent
    for item in chain:
        bs = _sub(node, "backingStore", type="file")
        _sub(bs, "format", type=item.format)
        src = _sub(bs, "source", file=str(item.path))
        if item.shared:
            _sub(src, "seclabel", model="dac", relabel="no")
        node = bs
    # An empty backingStore says "nothing below": libvirt must not look further.
    _sub(node, "backingStore")


def build_domain_xml(spec: DomainSpec) -> str:
    """The domain XML for ``spec`` (a string libvirt's ``defineXML`` accepts)."""
    if spec.virt_type not in ("kvm", "qemu"):
        raise ValidationError(f"virt type must be kvm or qemu, not {spec.virt_type!r}")
    dom = ET.Element("domain", type=spec.virt_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    md = _sub(dom, "metadata")
    inst = _sub(md, f"{{{METADATA_NS}}}instance")
    if spec.instances_path is not None:
        _sub(inst, f"{{{METADATA_NS}}}instances-path", str(spec.instances_path))
    if spec.image_id is not None:
        _sub(inst, f"{{{METADATA_NS}}}image", id=spec.image_id)
    if spec.flavor is not None:
        _sub(inst, f"{{{METADATA_NS}}}flavor", name=spec.flavor)
    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    if spec.kernel is not None:
        _sub(os_el, "kernel", str(spec.kernel))
        if spec.initrd is not None:
            _sub(os_el, "initrd", str(spec.initrd))
        if spec.cmdline:
            _sub(os_el, "cmdline", spec.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")

    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for disk in spec.disks:
        d = _sub(devices, "disk", type="file", device="disk")
        _sub(d, "driver", name="qemu", type=disk.format)
        _sub(d, "source", file=str(disk.path))
        _backing_chain(d, disk.backing)
        _sub(d, "target", dev=disk.target, bus="virtio")

    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log))
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=str(spec.console_log))
    _sub(console, "target", type="serial", port="0")
    _sub(devices, "memballoon", model="none")

    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValidationError(f"unreadable domain XML: {exc}") from exc


def parse_disks(xml: str) -> list[DiskTarget]:
    """Target and source of every disk, as ``virsh domblklist`` prints them."""
    root = _parse(xml)
    rows: list[DiskTarget] = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None:
            continue
        src = disk.find("source")
        source = "-"
        if src is not None:
            source = (
                src.get("file")
                or src.get("dev")
                or src.get("dir")
                or src.get("name")
                or src.get("volume")
                or "-"
            )
        rows.append(DiskTarget(target=target.get("dev", "-"), source=source))
    return rows


@dataclass(frozen=True)
class DomainFile:
    """A file a domain reads: a disk, a file of its ``<backingStore>``, the kernel, the initrd."""

    path: str
    format: str | None  # "qcow2", "raw"... as the XML tells libvirt; None: not said


def parse_files(xml: str) -> list[DomainFile]:
    """Every local file a domain's disks and direct kernel boot read, in document order."""
    root = _parse(xml)
    out: list[DomainFile] = []
    for disk in root.findall("./devices/disk"):
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        src = disk.find("source")
        path = (src.get("file") or src.get("dev")) if src is not None else None
        if path:
            out.append(DomainFile(path, fmt))
        for store in disk.iter("backingStore"):
            bsrc = store.find("source")
            bfmt = store.find("format")
            bpath = (bsrc.get("file") or bsrc.get("dev")) if bsrc is not None else None
            if bpath:
                out.append(DomainFile(bpath, bfmt.get("type") if bfmt is not None else None))
    for tag in ("kernel", "initrd"):
        el = root.find(f"./os/{tag}")
        if el is not None and el.text and el.text.strip():
            out.append(DomainFile(el.text.strip(), "raw"))
    return out


def parse_metadata(xml: str) -> DomainMetadata | None:
    """cowfleet's ``<metadata>`` entry, or None for a domain cowfleet did not define."""
    root = _parse(xml)
    inst = root.find(f"./metadata/{{{METADATA_NS}}}instance")
    if inst is None:
        return None
    path_el = inst.find(f"{{{METADATA_NS}}}instances-path")
    image_el = inst.find(f"{{{METADATA_NS}}}image")
    flavor_el = inst.find(f"{{{METADATA_NS}}}flavor")
    return DomainMetadata(
        instances_path=path_el.text if path_el is not None else None,
        image_id=image_el.get("id") if image_el is not None else None,
        flavor=flavor_el.get("name") if flavor_el is not None else None,
    )
