from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cowfleet.compute.domain_xml import (
    METADATA_NS,
    BackingSpec,
    DiskSpec,
    DomainSpec,
    build_domain_xml,
    parse_disks,
    parse_metadata,
)
from cowfleet.errors import ValidationError

UUID = "0debe180-ac32-49a4-9caa-5eebe834eef5"
INST = Path("/srv/instances")
BASE = INST / "_base"


def _spec(**kw: object) -> DomainSpec:
    folder = INST / UUID
    values: dict[str, object] = dict(
        name="web-1",
        uuid=UUID,
        virt_type="qemu",
        memory_mb=512,
        vcpus=2,
        disks=(
            DiskSpec("vda", folder / "disk", backing=(BackingSpec(BASE / "7d98", "raw"),)),
            DiskSpec(
                "vdb",
                folder / "disk.local",
                backing=(BackingSpec(BASE / "ephemeral_1_ext4_ephemeral0_abcdef0", "raw"),),
            ),
            DiskSpec("vdc", folder / "disk.swap", backing=(BackingSpec(BASE / "swap_64", "raw"),)),
        ),
        console_log=folder / "console.log",
        instances_path=INST,
        image_id="11111111-2222-3333-4444-555555555555",
        flavor="m1.tiny",
    )
    values.update(kw)
    return DomainSpec(**values)  # type: ignore[arg-type]


def test_basic_fields_parse_back() -> None:
    root = ET.fromstring(build_domain_xml(_spec()))
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "web-1"
    assert root.findtext("uuid") == UUID
    assert root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("memory") == "512"
    assert root.findtext("vcpu") == "2"
    assert root.find("./os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    assert root.find("./os/kernel") is None


def test_disks_are_virtio_qcow2_with_pinned_backing_chain() -> None:
    root = ET.fromstring(build_domain_xml(_spec()))
    disks = root.findall("./devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc"]  # type: ignore[union-attr]
    for d in disks:
        assert d.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
        drv = d.find("driver")
        assert drv is not None and drv.get("name") == "qemu" and drv.get("type") == "qcow2"
        bs = d.find("backingStore")
        assert bs is not None and bs.get("type") == "file"
        assert bs.find("format").get("type") == "raw"  # type: ignore[union-attr]
        src = bs.find("source")
        assert src is not None and src.get("file", "").startswith(str(BASE))
        # the shared base is never relabelled (chowned) by libvirt
        label = src.find("seclabel")
        assert label is not None and label.get("model") == "dac" and label.get("relabel") == "no"
        # the chain is closed: libvirt must not probe below the base
        end = bs.find("backingStore")
        assert end is not None and len(end) == 0 and not end.attrib
        # the overlay itself keeps default labelling
        assert d.find("source/seclabel") is None
    assert disks[0].find("source").get("file") == f"{INST}/{UUID}/disk"  # type: ignore[union-attr]


def test_kernel_initrd_cmdline_and_serial_console() -> None:
    spec = _spec(
        kernel=INST / UUID / "kernel",
        initrd=INST / UUID / "ramdisk",
        cmdline="console=ttyS0 root=/dev/vda",
        virt_type="kvm",
    )
    root = ET.fromstring(build_domain_xml(spec))
    assert root.get("type") == "kvm"
    assert root.findtext("./os/kernel") == f"{INST}/{UUID}/kernel"
    assert root.findtext("./os/initrd") == f"{INST}/{UUID}/ramdisk"
    assert root.findtext("./os/cmdline") == "console=ttyS0 root=/dev/vda"
    assert root.find("./os/boot") is None
    serial = root.find("./devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == f"{INST}/{UUID}/console.log"  # type: ignore[union-attr]
    assert root.find("./devices/interface") is None  # no network needed


def test_hostile_strings_are_escaped_not_injected() -> None:
    spec = _spec(cmdline='x"/><devices><disk/></devices><a b="')
    root = ET.fromstring(build_domain_xml(spec))
    assert root.findtext("./os/cmdline") is None  # no kernel: cmdline not used
    spec = _spec(kernel=Path("/k"), cmdline="x</cmdline><on_crash>preserve</on_crash>")
    root = ET.fromstring(build_domain_xml(spec))
    assert root.findtext("./os/cmdline") == "x</cmdline><on_crash>preserve</on_crash>"
    assert root.findtext("on_crash") == "destroy"


def test_bad_virt_type_refused() -> None:
    with pytest.raises(ValidationError, match="virt type"):
        build_domain_xml(_spec(virt_type="xen"))


def test_parse_disks_like_domblklist() -> None:
    rows = parse_disks(build_domain_xml(_spec()))
    assert [(r.target, r.source) for r in rows] == [
        ("vda", f"{INST}/{UUID}/disk"),
        ("vdb", f"{INST}/{UUID}/disk.local"),
        ("vdc", f"{INST}/{UUID}/disk.swap"),
    ]
    cdrom = "<domain><devices><disk device='cdrom'><target dev='sda'/></disk></devices></domain>"
    assert [(r.target, r.source) for r in parse_disks(cdrom)] == [("sda", "-")]


def test_metadata_round_trip_and_foreign_domains() -> None:
    md = parse_metadata(build_domain_xml(_spec()))
    assert md is not None
    assert md.instances_path == str(INST)
    assert md.flavor == "m1.tiny"
    assert md.image_id == "11111111-2222-3333-4444-555555555555"
    assert METADATA_NS in build_domain_xml(_spec())
    assert parse_metadata("<domain><name>other</name></domain>") is None
    with pytest.raises(ValidationError):
        parse_metadata("<domain>")
