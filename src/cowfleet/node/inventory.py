"""What a node offers and holds: capacity, free disk, cache inventory, instances with states.

Capacity comes from the host (CPUs, memory, the instances path's filesystem) unless
the settings ``node_vcpus``/``node_ram_mb``/``node_disk_gb`` set it (the ``none``
driver, or to keep host resources back). The instance list is read from the
instances path (``instance.json`` of each folder) and the driver, never from memory:
after a restart the node reports exactly what exists.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cowfleet.compute import instance as inst
from cowfleet.compute.drivers.base import NO_HYPERVISOR, DomainInfo
from cowfleet.compute.state import BROKEN_FOLDER, INCOMPLETE, MISSING_DOMAIN, ServerRow, reconcile
from cowfleet.config import Config
from cowfleet.errors import CowfleetError
from cowfleet.node.spec import (
    ACTIVE,
    CRASHED,
    ERROR,
    NOSTATE,
    PAUSED,
    RUNNING,
    SHUTDOWN,
    SHUTOFF,
    SUSPENDED,
    InstanceView,
)

if TYPE_CHECKING:
    from cowfleet.cache.layout import Layout

GIB = 1024**3
MIB = 1024**2
# A none-driver instance has no hypervisor to ask: its power state is this file in its folder.
POWER_FILE = "power.state"
POWER_OFF = "off"


@dataclass(frozen=True)
class Capacity:
    vcpus: int
    ram_mb: int
    disk_gb: int


# platform.machine() spellings -> the names Glance's hw_architecture uses
_ARCH_NAMES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def host_arch(machine: Callable[[], str] = platform.machine) -> str | None:
    """The host's CPU architecture as images name it (``x86_64``, ``aarch64`` ...)."""
    name = machine().strip().lower()
    return _ARCH_NAMES.get(name, name) or None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def host_ram_mb() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB


def capacity(
    cfg: Config,
    *,
    cpu_count: Callable[[], int | None] = os.cpu_count,
    ram_mb: Callable[[], int] = host_ram_mb,
    statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
) -> Capacity:
    """The capacity offered: each setting above 0 wins over the host's figure."""
    vcpus = cfg.node_vcpus or cpu_count() or 1
    ram = cfg.node_ram_mb or ram_mb()
    disk = cfg.node_disk_gb
    if not disk:
        st = statvfs(_existing(cfg.instances_path))
        disk = st.f_blocks * st.f_frsize // GIB
    return Capacity(vcpus=vcpus, ram_mb=ram, disk_gb=disk)


def disk_free_gb(path: Path, *, statvfs: Callable[[Path], os.statvfs_result] = os.statvfs) -> int:
    """Free space (for unprivileged users) on the filesystem of ``path``, in whole GiB."""
    st = statvfs(_existing(path))
    return st.f_bavail * st.f_frsize // GIB


def cache_inventory(instances_path: Path) -> list[dict[str, Any]]:
    """The image bases in ``_base``: image id, verified or not, bytes on disk, and the
    base's ``state`` (``verified``, ``unverified``, ``failed``; ``fetching`` with a
    ``percent`` for a ``.part`` in progress; ``quarantined`` for a base moved aside).

    Read from the cache listing without scanning instance disks (a heartbeat must
    stay cheap with hundreds of instances).
    """
    from cowfleet.cache.layout import Layout
    from cowfleet.cache.listing import list_entries
    from cowfleet.cache.usage import Usage

    layout = Layout(instances_path)
    nobody = Usage(instances_path, 0, 0, {}, {})
    out = []
    for e in list_entries(layout, nobody):
        if e.kind == "base" and e.image_id:
            out.append(
                {
                    "image_id": e.image_id,
                    "verified": e.state == "verified",
                    "bytes": e.allocated,
                    "state": e.state,
                    "name": e.image_name,
                }
            )
        elif e.kind == "part" and e.image_id:
            out.append(_fetching(layout, e.name, e.image_id, e.size, e.allocated))
        elif e.kind == "quarantined" and e.image_id:
            out.append(
                {
                    "image_id": e.image_id,
                    "verified": False,
                    "bytes": e.allocated,
                    "state": "quarantined",
                    "name": e.image_name,
                }
            )
    return out


def _fetching(
    layout: Layout, name: str, image_id: str, size: int, allocated: int
) -> dict[str, Any]:
    """A download in progress: how far its ``.part`` is (``percent`` when its size is known)."""
    from cowfleet.cache import metadata as md

    record = md.read_part_meta(layout.paths_for_name(name.partition(".")[0]).part_meta)
    total = record.image_size if record is not None else 0
    percent = round(min(100.0, 100.0 * size / total), 1) if total > 0 else None
    return {
        "image_id": image_id,
        "verified": False,
        "bytes": allocated,
        "state": "fetching",
        "percent": percent,
        "size": total or None,
    }


# libvirt state words (drivers.base.STATE_NAMES) -> node state and Nova power_state
_LIBVIRT_STATES: dict[str, tuple[str, int]] = {
    "no state": (ACTIVE, NOSTATE),
    "running": (ACTIVE, RUNNING),
    "idle": (ACTIVE, RUNNING),
    "paused": (ACTIVE, PAUSED),
    "in shutdown": (ACTIVE, RUNNING),
    "shut off": (SHUTOFF, SHUTDOWN),
    "crashed": (SHUTOFF, CRASHED),
    "pmsuspended": (ACTIVE, SUSPENDED),
}


def none_power_off(folder: Path) -> bool:
    try:
        return (folder / POWER_FILE).read_text().strip() == POWER_OFF
    except OSError:
        return False


def view_of(row: ServerRow, entry: inst.FolderEntry | None) -> InstanceView:
    """The protocol's view of one reconciled row (folder + domain)."""
    rec = entry.record if entry else None
    spec = rec.spec if rec else None
    name = spec.get("name") if spec else None
    image_id = row.image_id
    if row.state == NO_HYPERVISOR and entry is not None:
        off = none_power_off(entry.path)
        state, power = (SHUTOFF, SHUTDOWN) if off else (ACTIVE, RUNNING)
        return InstanceView(row.uuid, state, power, None, name, image_id)
    if row.state in _LIBVIRT_STATES:
        state, power = _LIBVIRT_STATES[row.state]
        return InstanceView(row.uuid, state, power, None, name, image_id)
    if row.state == INCOMPLETE:
        fault = "build interrupted (the agent stopped during it); delete the server"
    elif row.state == MISSING_DOMAIN:
        fault = "the hypervisor has no domain for this instance folder"
    elif row.state == BROKEN_FOLDER:
        fault = f"broken instance folder: {row.problem}"
    else:
        fault = f"{row.state}: {row.problem}" if row.problem else row.state
    return InstanceView(row.uuid, ERROR, NOSTATE, " ".join(fault.split()), name, image_id)


def instance_views(
    instances_path: Path, domains: Mapping[str, DomainInfo] | Iterable[DomainInfo]
) -> dict[str, InstanceView]:
    """Every instance on this node (folders, and cowfleet domains without one), by uuid."""
    entries = inst.scan(instances_path)
    by_uuid = {e.uuid: e for e in entries}
    doms = domains if isinstance(domains, Mapping) else {d.uuid: d for d in domains}
    rows = reconcile(entries, doms, instances_path)
    return {r.uuid: view_of(r, by_uuid.get(r.uuid)) for r in rows}


def instance_view(
    instances_path: Path, uuid: str, domain: DomainInfo | None
) -> InstanceView | None:
    """One instance, read from its folder and its domain alone (no scan of the others)."""
    folder = instances_path / uuid
    tmp = instances_path / f".{uuid}.tmp"
    entries: list[inst.FolderEntry] = []
    if folder.is_dir():
        try:
            entries.append(inst.FolderEntry(uuid, folder, inst.read_record(folder)))
        except (CowfleetError, OSError) as exc:
            entries.append(inst.FolderEntry(uuid, folder, None, problem=str(exc)))
    elif tmp.is_dir():
        entries.append(
            inst.FolderEntry(uuid, tmp, None, problem="unfinished creation", incomplete=True)
        )
    doms = {uuid: domain} if domain is not None else {}
    for row in reconcile(entries, doms, instances_path):
        if row.uuid == uuid:
            return view_of(row, entries[0] if entries else None)
    return None
