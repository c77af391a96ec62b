"""Issue 13, item 1: every place a base can be in use keeps it, and says so.

Cleaner passes on real bases (made by ImageCache with a fake image service) with
the in-use sources injected: symlinked disks and folders, a fake libvirt domain
lister, a fake ``/proc`` tree. Real libvirt and real processes are in
tests/integration/test_cache_inuse_real.py and tests/e2e/test_libvirt_inuse.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cowfleet.cache import pins
from cowfleet.cache.clean import KEEP, REMOVE, CleanReport, Decision
from cowfleet.cache.holders import DomainDisk, DomainHolders, ProcessHolders, parse_maps
from cowfleet.cache.listing import list_entries
from cowfleet.cache.usage import HeldFile, Holders
from cowfleet.compute.domain_xml import parse_files
from cowfleet.compute.drivers.libvirt import LibvirtDriver
from cowfleet.errors import BackendUnavailableError
from cowfleet.formats.overlay import create_overlay
from tests.unit.test_cache_clean import Clock, FakeStatvfs, Node

KiB = 1024


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, Clock(time.time()))


def _by_name(report: CleanReport) -> dict[str, Decision]:
    return {d.name: d for d in report.decisions}


def _overlay(out: Path, backing: Path, size: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    create_overlay(out, backing, "raw", size=size, backing_virtual_size=size, durable=False)
    return out


def _run(node: Node, *sources: object, dry_run: bool = False) -> dict[str, Decision]:
    cleaner = node.cleaner(FakeStatvfs(1, 1), max_unused_age=0.0)
    cleaner.sources = tuple(sources)  # type: ignore[arg-type]
    return _by_name(cleaner.run(dry_run=dry_run))


class FakeLister:
    def __init__(self, disks: list[DomainDisk] | None = None, fail: bool = False) -> None:
        self.disks = disks or []
        self.fail = fail

    def domain_disks(self) -> list[DomainDisk]:
        if self.fail:
            raise BackendUnavailableError("libvirt is unreachable at qemu:///system")
        return list(self.disks)


def test_symlinked_disk_keeps_its_base_from_age_out(node: Node) -> None:
    used, unused = node.base(last_used=0.0), node.base(last_used=0.0)
    real = _overlay(node.tmp / "elsewhere" / "vm.qcow2", node.path(used), 64 * KiB)
    folder = node.cfg.instances_path / "0b6f4c1e-1d7e-4c2a-9f0e-6a1f2b3c4d01"
    folder.mkdir()
    (folder / "disk").symlink_to(real)
    got = _run(node)
    assert got[node.name(unused)].action == REMOVE  # the age-out does run
    d = got[node.name(used)]
    assert d.action == KEEP and node.path(used).exists()
    assert d.in_use_by == (f"disk {folder / 'disk'}",)
    assert d.reason == "in use by 1 instances"


def test_symlinked_instance_folder_keeps_its_base_from_age_out(node: Node) -> None:
    iid = node.base(last_used=0.0)
    real = node.instance(iid)
    moved = node.tmp / "moved" / real.name
    moved.parent.mkdir()
    real.rename(moved)
    real.symlink_to(moved, target_is_directory=True)
    d = _run(node)[node.name(iid)]
    assert d.action == KEEP and node.path(iid).exists() and d.users == (real.name,)


def test_dangling_symlinked_disk_removes_nothing(node: Node) -> None:
    iid = node.base(last_used=0.0)
    folder = node.cfg.instances_path / "0b6f4c1e-1d7e-4c2a-9f0e-6a1f2b3c4d01"
    folder.mkdir()
    (folder / "disk").symlink_to(node.tmp / "not-mounted" / "vm.qcow2")
    d = _run(node)[node.name(iid)]
    assert d.action == KEEP and "could not be read" in d.reason and node.path(iid).exists()


def test_libvirt_domain_disk_outside_the_instances_path_keeps_its_base(node: Node) -> None:
    iid, unused = node.base(last_used=0.0), node.base(last_used=0.0)
    top = _overlay(node.tmp / "vms" / "web.qcow2", node.path(iid), 64 * KiB)
    lister = FakeLister([DomainDisk("web", str(top), "qcow2")])
    for dry_run in (True, False):
        got = _run(node, DomainHolders(lister), dry_run=dry_run)
        d = got[node.name(iid)]
        assert d.action == KEEP and d.in_use_by == ("libvirt domain web",)
        assert d.reason == "in use by libvirt domain web" and d.users == ()
    assert node.path(iid).exists() and not node.path(unused).exists()


def test_raw_domain_disk_that_is_a_base_keeps_it_and_is_not_parsed(node: Node) -> None:
    iid = node.base(last_used=0.0)
    lister = FakeLister([DomainDisk("raw-vm", str(node.path(iid)), "raw")])
    d = _run(node, DomainHolders(lister))[node.name(iid)]
    assert d.action == KEEP and d.in_use_by == ("libvirt domain raw-vm",)


def test_unreachable_hypervisor_removes_nothing(node: Node) -> None:
    iid = node.base(last_used=0.0)
    cleaner = node.cleaner(FakeStatvfs(1, 1), max_unused_age=0.0)
    cleaner.sources = (DomainHolders(FakeLister(fail=True)),)
    report = cleaner.run()
    assert report.count(REMOVE) == 0 and node.path(iid).exists()
    assert any("unreachable" in p.reason for p in report.unreadable)


def _fake_proc(root: Path, pid: int, comm: str, fds: list[Path], maps: str = "") -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "maps").write_text(maps)
    for n, target in enumerate(fds, start=3):
        (d / "fd" / str(n)).symlink_to(target)


def test_process_holding_or_mapping_a_base_keeps_it(node: Node) -> None:
    held, mapped, free = (node.base(last_used=0.0) for _ in range(3))
    st = os.stat(node.path(mapped))
    line = (
        f"7f00-7f10 r--s 00000000 {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} "
        f"{st.st_ino}    {node.path(mapped)}\n"
    )
    proc = node.tmp / "proc"
    _fake_proc(proc, 812, "qemu-system-x86", [node.path(held), Path("/dev/null")])
    _fake_proc(proc, 900, "mapper", [], maps=line)
    _fake_proc(proc, 1, "me", [node.path(free)])  # our own pid: never counted
    got = _run(node, ProcessHolders(proc, own_pid=1))
    assert got[node.name(held)].in_use_by == ("process 812 qemu-system-x86",)
    assert got[node.name(mapped)].in_use_by == ("process 900 mapper",)
    assert got[node.name(held)].action == KEEP and got[node.name(mapped)].action == KEEP
    assert got[node.name(free)].action == REMOVE


def test_parse_maps_reads_device_and_inode() -> None:
    lines = [
        "55d0-55d1 r-xp 00000000 fd:01 1234 /usr/bin/qemu",
        "7ffd-7ffe rw-p 00000000 00:00 0 [stack]",
        "7f00-7f01 rw-p 00000000 00:00 0",
        "7f02-7f03 r--s 00001000 08:11 99 /var/lib/nova/instances/_base/x (deleted)",
    ]
    assert parse_maps(lines) == {(os.makedev(0xFD, 1), 1234), (os.makedev(8, 0x11), 99)}


def test_cache_list_says_pin_and_holders(node: Node) -> None:
    iid = node.base()
    name = node.name(iid)
    held = Holders(files=(HeldFile("process 5 qemu", ident=_ident(node.path(iid))),))
    with pins.hold(node.layout.locks_dir, [name]):
        [e] = [e for e in list_entries(node.layout, holders=held) if e.name == name]
    assert e.in_use_by == ("process 5 qemu", "pin") and e.used


def _ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


DOMAIN_XML = """<domain type='qemu'><name>web</name>
<os><type>hvm</type><kernel>/b/_base/kern</kernel><initrd>/b/_base/rd</initrd></os>
<devices>
 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/vms/web.qcow2'/>
  <backingStore type='file'><format type='raw'/><source file='/b/_base/abc'/>
   <backingStore/></backingStore>
  <target dev='vda'/></disk>
 <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/>
  <target dev='vdb'/></disk>
 <disk type='file' device='cdrom'><target dev='hdc'/></disk>
</devices></domain>"""


def test_parse_files_of_a_domain() -> None:
    got = [(f.path, f.format) for f in parse_files(DOMAIN_XML)]
    assert got == [
        ("/vms/web.qcow2", "qcow2"),
        ("/b/_base/abc", "raw"),
        ("/b/_base/kern", "raw"),
        ("/b/_base/rd", "raw"),
    ]


class _Dom:
    def __init__(self, name: str, active: bool, live: str, inactive: str) -> None:
        self._name, self.active, self.live, self.inactive = name, active, live, inactive

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        return int(self.active)

    def XMLDesc(self, flags: int) -> str:
        return self.inactive if flags & 2 else self.live


class _Conn:
    def __init__(self, *doms: _Dom) -> None:
        self.doms = doms

    def listAllDomains(self, flags: int) -> list[_Dom]:
        return list(self.doms)

    def close(self) -> None:
        pass


def _xml(name: str, disk: str) -> str:
    return (
        f"<domain><name>{name}</name><devices><disk type='file'><driver type='qcow2'/>"
        f"<source file='{disk}'/><target dev='vda'/></disk></devices></domain>"
    )


def test_libvirt_driver_lists_disks_of_running_and_stopped_domains() -> None:
    conn = _Conn(
        _Dom("off", False, _xml("off", "/vms/off.qcow2"), "unused"),
        _Dom("on", True, _xml("on", "/vms/live.qcow2"), _xml("on", "/vms/next-boot.qcow2")),
    )
    drv = LibvirtDriver("test:///", opener=lambda _uri: conn)
    got = [(d.domain, d.path, d.format) for d in drv.domain_disks()]
    assert got == [
        ("off", "/vms/off.qcow2", "qcow2"),
        ("on", "/vms/live.qcow2", "qcow2"),
        ("on", "/vms/next-boot.qcow2", "qcow2"),
    ]
