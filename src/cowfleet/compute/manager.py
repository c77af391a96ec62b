"""list / show / disks / start / stop / delete / console for the servers of a node.

Each instance is handled by the driver recorded in its ``instance.json``; the
configured driver decides which hypervisor is asked about orphan domains.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowfleet.compute import instance as inst
from cowfleet.compute.domain_xml import DiskTarget
from cowfleet.compute.drivers import make_driver
from cowfleet.compute.drivers.base import DomainInfo, Driver
from cowfleet.compute.provision import domain_spec
from cowfleet.compute.state import MISSING_DOMAIN, ORPHAN_DOMAIN, ServerRow, reconcile
from cowfleet.config import Config
from cowfleet.errors import (
    BackendUnavailableError,
    LocalIOError,
    NotFoundError,
    ValidationError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerDetail:
    row: ServerRow
    folder: Path | None
    record: inst.InstanceRecord | None
    disks: list[DiskTarget]
    # bases the instance needs that are missing: quarantined, being fetched again, image gone
    base_notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = self.row.to_dict()
        out["folder"] = str(self.folder) if self.folder else None
        out["disks"] = [{"target": d.target, "source": d.source} for d in self.disks]
        out["record"] = self.record.to_dict() if self.record else None
        out["base_notes"] = list(self.base_notes)
        return out


class ServerManager:
    def __init__(self, cfg: Config, *, drivers: Callable[[str], Driver] | None = None) -> None:
        self.cfg = cfg
        self._make = drivers or (lambda name: make_driver(name, cfg))
        self._drivers: dict[str, Driver] = {}

    def driver(self, name: str) -> Driver:
        if name not in self._drivers:
            self._drivers[name] = self._make(name)
        return self._drivers[name]

    def close(self) -> None:
        for d in self._drivers.values():
            d.close()
        self._drivers.clear()

    def __enter__(self) -> ServerManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reading --------------------------------------------------------------
    def _domains(self, entries: list[inst.FolderEntry]) -> dict[str, DomainInfo] | None:
        needs = any(e.record is not None and e.record.driver == "libvirt" for e in entries)
        if not needs and self.cfg.driver != "libvirt":
            return {}
        try:
            return {d.uuid: d for d in self.driver("libvirt").list_domains()}
        except BackendUnavailableError:
            if needs:
                raise
            log.warning(
                "libvirt is unreachable at %s: orphan domains were not checked",
                self.cfg.libvirt_uri,
            )
            return {}

    def list_servers(self) -> list[ServerRow]:
        entries = inst.scan(self.cfg.instances_path)
        return reconcile(entries, self._domains(entries), self.cfg.instances_path)

    def _row(self, ref: str) -> tuple[ServerRow, inst.FolderEntry | None]:
        try:
            entry: inst.FolderEntry | None = inst.find(self.cfg.instances_path, ref)
        except NotFoundError:
            entry = None
        if entry is not None:
            domains: dict[str, DomainInfo] = {}
            uses_libvirt = (
                entry.record.driver == "libvirt"
                if entry.record is not None
                else self.cfg.driver == "libvirt"
            )
            if uses_libvirt:
                info = self.driver("libvirt").info(entry.uuid)
                if info is not None:
                    domains[entry.uuid] = info
            return reconcile([entry], domains, self.cfg.instances_path)[0], entry
        # Not a folder: maybe an orphan domain of this instances path.
        for row in self.list_servers():
            if row.state == ORPHAN_DOMAIN and ref in (row.uuid, row.name):
                return row, None
        raise NotFoundError(f"server {ref!r} not found in {self.cfg.instances_path}", server=ref)

    def _folder_disks(self, entry: inst.FolderEntry) -> list[DiskTarget]:
        if entry.record is None:
            return []
        return [DiskTarget(d.target, str(entry.path / d.file)) for d in entry.record.disks]

    def show(self, ref: str) -> ServerDetail:
        row, entry = self._row(ref)
        record = entry.record if entry else None
        return ServerDetail(
            row=row,
            folder=entry.path if entry else None,
            record=record,
            disks=self._disks(row, entry),
            base_notes=self._base_notes(record) if record else (),
        )

    def _base_notes(self, rec: inst.InstanceRecord) -> tuple[str, ...]:
        from cowfleet.cache.layout import Layout
        from cowfleet.cache.listing import base_note

        layout = Layout(self.cfg.instances_path)
        bases = [d.backing for d in rec.disks]
        bases += [b for b in (rec.kernel_base, rec.ramdisk_base) if b]
        notes = (base_note(layout, Path(b)) for b in dict.fromkeys(bases))
        return tuple(n for n in notes if n)

    def _disks(self, row: ServerRow, entry: inst.FolderEntry | None) -> list[DiskTarget]:
        if row.driver == "libvirt" and row.state != MISSING_DOMAIN:
            live = self.driver("libvirt").disks(row.uuid)
            if live is not None:
                return live
        return self._folder_disks(entry) if entry else []

    def disks(self, ref: str) -> list[DiskTarget]:
        """Target and source of each disk: from the domain when the hypervisor has one."""
        row, entry = self._row(ref)
        return self._disks(row, entry)

    def console(self, ref: str) -> bytes:
        _row, entry = self._row(ref)
        if entry is None:
            raise NotFoundError(f"server {ref!r} has no instance folder (orphan domain)")
        path = inst.InstanceDir(entry.path).console_log
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"no console log: {path}", path=str(path)) from exc
        except OSError as exc:
            raise LocalIOError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc

    # acting ---------------------------------------------------------------
    def _record(self, ref: str) -> inst.InstanceRecord:
        entry = inst.find(self.cfg.instances_path, ref)
        if entry.record is None:
            raise ValidationError(f"server {ref!r}: {entry.problem}", server=ref)
        return entry.record

    def start(self, ref: str) -> ServerRow:
        rec = self._record(ref)
        drv = self.driver(rec.driver)
        if rec.driver == "libvirt" and drv.info(rec.uuid) is None:
            log.warning("server %s had no domain: defining it again from its folder", rec.name)
            drv.define(domain_spec(self.cfg, rec))
        drv.start(rec.uuid)
        return self._row(rec.uuid)[0]

    def stop(self, ref: str, *, force: bool = False, timeout: float = 60.0) -> ServerRow:
        rec = self._record(ref)
        drv = self.driver(rec.driver)
        if rec.driver == "libvirt" and drv.info(rec.uuid) is None:
            raise NotFoundError(f"server {rec.name}: libvirt has no domain {rec.uuid}")
        drv.stop(rec.uuid, force=force, timeout=timeout)
        return self._row(rec.uuid)[0]

    def delete(self, ref: str) -> ServerRow:
        """Destroy and undefine the domain, then remove the instance folder (never a base)."""
        row, entry = self._row(ref)
        driver_name = row.driver or self.cfg.driver
        if driver_name == "libvirt" or row.state == ORPHAN_DOMAIN:
            self.driver("libvirt").undefine(row.uuid)
        if entry is not None:
            _remove_folder(entry.path)
        if row.name and row.name != "-":
            with contextlib.suppress(ValidationError):
                inst.release_name(self.cfg.instances_path, row.name, row.uuid)
        log.info("deleted server %s (%s)", row.name, row.uuid)
        return row


def _remove_folder(folder: Path) -> None:
    # The folder holds regular files only; rmtree never follows symlinks, so a
    # base in _base (referenced by path inside the overlays) is never touched.
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
