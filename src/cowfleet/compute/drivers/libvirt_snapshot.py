"""Live snapshots of a running libvirt guest's root disk, for ``createImage``.

:func:`disk_snapshot`: a disk-only external snapshot (``DISK_ONLY | NO_METADATA |
ATOMIC``) of one disk: the guest goes on writing into a new qcow2 overlay whose backing
file is the old top (``disk``), which stops changing and can be read at leisure. The
other disks are left alone (``snapshot='no'``). No libvirt snapshot object is kept.

:func:`commit_back`: an active block commit of that overlay into ``disk`` (``SHALLOW``:
never further down the chain: the shared base in ``_base`` is read-only), waited for
until it is ready, then pivoted: the guest writes to ``disk`` again. The overlay is
then removed.

Both return the seconds their one guest-visible step took (the snapshot call and the
pivot): the guest's vCPUs are not paused for either, its disk I/O is drained for that
long at most.

:func:`recover_overlay` is for a node agent that died in between.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from cowfleet import proc
from cowfleet.compute.domain_xml import parse_disks
from cowfleet.errors import CommandError, ConflictError, TimeoutError_
from cowfleet.formats.overlay import create_overlay
from cowfleet.formats.qcow2 import parse_header

log = logging.getLogger(__name__)

SNAPSHOT_FLAGS = 16 | 4 | 128  # DISK_ONLY | NO_METADATA | ATOMIC
REUSE_EXT = 32  # the overlay is made beforehand (our own writer), not inside the call
COMMIT_FLAGS = 4 | 1  # ACTIVE | SHALLOW
ABORT_PIVOT = 2
XML_INACTIVE = 2
COMMIT_TIMEOUT = 3600.0


def snapshot_xml(target: str, overlay: Path, targets: list[str]) -> str:
    disks = [
        f"<disk name={quoteattr(target)} snapshot='external'>"
        f"<driver type='qcow2'/><source file={quoteattr(str(overlay))}/></disk>"
    ]
    disks += [f"<disk name={quoteattr(t)} snapshot='no'/>" for t in targets if t != target]
    return (
        "<domainsnapshot><name>cowfleet-create-image</name>"
        "<description>cowfleet createImage: temporary overlay</description>"
        f"<disks>{''.join(disks)}</disks></domainsnapshot>"
    )


def _source(dom: Any, target: str, flags: int = 0) -> str | None:
    for d in parse_disks(dom.XMLDesc(flags)):
        if d.target == target:
            return d.source
    return None


def disk_snapshot(driver: Any, uuid: str, target: str, overlay: Path) -> float:
    dom = driver._lookup(uuid)
    with driver._translate("read domain XML", uuid):
        targets = [d.target for d in parse_disks(dom.XMLDesc(0))]
    if target not in targets:
        raise ConflictError(f"server {uuid} has no disk {target}", server=uuid)
    if overlay.exists():
        raise ConflictError(f"{overlay} exists: an unfinished snapshot", server=uuid)
    xml = snapshot_xml(target, overlay, targets)
    # The overlay is written before the call (no qemu-img inside libvirt's call: the
    # call then only switches the disk, which is what the guest may notice).
    disk = Path(_source(dom, target) or "")
    with disk.open("rb") as fh:
        head = parse_header(fh.read(4096))
    create_overlay(overlay, disk, "qcow2", backing_virtual_size=head.virtual_size, replace=False)
    start = time.monotonic()
    try:
        with driver._translate("external disk snapshot", uuid):
            dom.snapshotCreateXML(xml, SNAPSHOT_FLAGS | REUSE_EXT)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            overlay.unlink()
        raise
    seconds = time.monotonic() - start
    log.info("server %s now writes to %s (snapshot call %.1f ms)", uuid, overlay, seconds * 1e3)
    return seconds


def _wait_ready(driver: Any, dom: Any, uuid: str, target: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        with driver._translate("block job info", uuid):
            info = dom.blockJobInfo(target, 0)
        if not info:
            raise CommandError(f"server {uuid}: the block commit of {target} vanished")
        ready = info.get("ready")
        end = int(info.get("end", 0))
        if ready == 1 or (ready is None and end > 0 and int(info.get("cur", 0)) == end):
            return
        if time.monotonic() > deadline:
            raise TimeoutError_(f"server {uuid}: block commit not ready after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def commit_back(
    driver: Any, uuid: str, target: str, overlay: Path, timeout: float = COMMIT_TIMEOUT
) -> float:
    """Merge ``overlay`` into the file under it and pivot the guest back; the pivot's
    seconds. Nothing to do (0.0) when the guest no longer writes to ``overlay``."""
    dom = driver._lookup(uuid)
    with driver._translate("read domain XML", uuid):
        active = bool(dom.isActive())
        source = _source(dom, target) if active else None
    if source != str(overlay):
        log.info("server %s does not write to %s: nothing to commit", uuid, overlay)
        if active:
            with contextlib.suppress(FileNotFoundError):
                overlay.unlink()
        else:
            recover_overlay(driver, uuid, target, overlay.parent / "disk", overlay)
        return 0.0
    with driver._translate("block commit", uuid):
        dom.blockCommit(target, None, None, 0, COMMIT_FLAGS)
    _wait_ready(driver, dom, uuid, target, timeout)
    start = time.monotonic()
    with driver._translate("block commit pivot", uuid):
        dom.blockJobAbort(target, ABORT_PIVOT)
    seconds = time.monotonic() - start
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the job ends, the guest's source is the old top
        with driver._translate("block job info", uuid):
            if not dom.blockJobInfo(target, 0) and _source(dom, target) != str(overlay):
                break
        time.sleep(0.01)
    _fix_persistent(driver, dom, uuid, target, overlay)
    with contextlib.suppress(FileNotFoundError):
        overlay.unlink()
    log.info("server %s writes to its disk again (pivot %.1f ms)", uuid, seconds * 1e3)
    return seconds


def _fix_persistent(driver: Any, dom: Any, uuid: str, target: str, overlay: Path) -> None:
    """The persistent definition must not keep the overlay (a libvirt that updates
    only the live one): put the disk's own file back."""
    with driver._translate("read domain XML", uuid):
        if not dom.isPersistent():
            return
        xml = dom.XMLDesc(XML_INACTIVE)
    if str(overlay) not in xml:
        return
    fixed = _strip_overlay(xml, target, overlay)
    conn = driver._connection()
    with driver._translate("define domain", uuid):
        conn.defineXML(fixed)
    log.info("server %s: persistent definition points at its disk again", uuid)


def _strip_overlay(xml: str, target: str, overlay: Path) -> str:
    """``xml`` with the overlay's source replaced by its backing file, backingStore dropped."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        src = disk.find("source")
        if tgt is None or src is None or tgt.get("dev") != target:
            continue
        if src.get("file") != str(overlay):
            continue
        src.set("file", str(overlay.parent / "disk"))
        for bs in disk.findall("backingStore"):
            disk.remove(bs)
    return ET.tostring(root, encoding="unicode")


def recover_overlay(driver: Any, uuid: str, target: str, disk: Path, overlay: Path) -> None:
    """After an agent died mid-snapshot: merge ``overlay`` back into ``disk`` and remove it.

    A running guest writing to it: an active commit and pivot. A stopped one: ``qemu-img
    commit`` (into ``disk`` only) and the persistent definition put back. A domain that
    does not use it (or no domain): the overlay is removed, never merged (its data may be
    older than the disk's).
    """
    dom = driver._find(uuid)
    if dom is not None:
        with driver._translate("read domain XML", uuid):
            active = bool(dom.isActive())
        if active:
            commit_back(driver, uuid, target, overlay)
            return
        with driver._translate("read domain XML", uuid):
            persistent_source = _source(dom, target, XML_INACTIVE)
        if persistent_source == str(overlay) and overlay.exists():
            proc.run(["qemu-img", "commit", "-f", "qcow2", "-d", str(overlay)], timeout=3600)
            _fix_persistent(driver, dom, uuid, target, overlay)
    with contextlib.suppress(FileNotFoundError):
        overlay.unlink()
    log.warning("server %s: temporary overlay %s merged and removed", uuid, overlay)
