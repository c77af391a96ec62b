"""Instance folders and cowfleet's record of an instance (``instance.json``).

Layout of ``<instances_path>/<uuid>/`` (as Nova's, plus cowfleet's record)::

    disk          qcow2 overlay on _base/<sha1(image id)>        (vda)
    disk.local    qcow2 overlay on _base/ephemeral_...           (vdb, if ephemeral_gb)
    disk.swap     qcow2 overlay on _base/swap_<MiB>              (vdc, if swap_mb)
    disk.info     one JSON line {"<abs path>": "qcow2", ...}: every disk's format, pinned
    console.log   the serial console
    kernel        copy of the kernel base (aki images), so libvirt relabels a private file
    ramdisk       copy of the ramdisk base (ari images)
    instance.json this record

The folders are the truth about which instances exist on the node; the
hypervisor is the truth about their state.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowfleet.compute.flavors import Flavor
from cowfleet.errors import ConflictError, LocalIOError, NotFoundError, ValidationError

log = logging.getLogger(__name__)

RECORD = "instance.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# disk file -> guest target, in attach order
DISK_TARGETS: tuple[tuple[str, str], ...] = (
    ("disk", "vda"),
    ("disk.local", "vdb"),
    ("disk.swap", "vdc"),
)


def validate_name(name: str) -> str:
    """Instance names: 1-63 of [A-Za-z0-9._-], starting with a letter or digit."""
    if not NAME_RE.match(name):
        raise ValidationError(
            f"invalid server name {name!r}: use 1-63 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    if is_uuid(name):
        raise ValidationError(f"a server name must not be a UUID: {name!r}")
    return name


def is_uuid(text: str) -> bool:
    return bool(_UUID_RE.match(text))


@dataclass(frozen=True)
class DiskRecord:
    """One instance disk: file name in the folder, guest target, and its backing base."""

    file: str
    target: str
    backing: str  # absolute path of the base in _base
    backing_format: str
    virtual_size: int


@dataclass(frozen=True)
class InstanceRecord:
    uuid: str
    name: str
    created_at: str
    driver: str
    virt_type: str
    image_id: str
    image_name: str | None
    image_disk_format: str | None
    flavor: Flavor
    disks: tuple[DiskRecord, ...]
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    kernel_base: str | None = None
    ramdisk_base: str | None = None
    os_command_line: str | None = None
    # the build spec a controller sent (``serve node``); None for a local ``server create``
    spec: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "uuid": self.uuid,
            "name": self.name,
            "created_at": self.created_at,
            "driver": self.driver,
            "virt_type": self.virt_type,
            "image": {
                "id": self.image_id,
                "name": self.image_name,
                "disk_format": self.image_disk_format,
            },
            "flavor": self.flavor.to_dict(),
            "disks": [
                {
                    "file": d.file,
                    "target": d.target,
                    "backing": d.backing,
                    "backing_format": d.backing_format,
                    "virtual_size": d.virtual_size,
                }
                for d in self.disks
            ],
            "kernel_id": self.kernel_id,
            "ramdisk_id": self.ramdisk_id,
            "kernel_base": self.kernel_base,
            "ramdisk_base": self.ramdisk_base,
            "os_command_line": self.os_command_line,
        }
        if self.spec is not None:
            out["spec"] = self.spec
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceRecord:
        try:
            image = data["image"]
            rec = cls(
                uuid=str(data["uuid"]),
                name=str(data["name"]),
                created_at=str(data["created_at"]),
                driver=str(data["driver"]),
                virt_type=str(data.get("virt_type", "kvm")),
                image_id=str(image["id"]),
                image_name=image.get("name"),
                image_disk_format=image.get("disk_format"),
                flavor=Flavor.from_dict(data["flavor"]),
                disks=tuple(
                    DiskRecord(
                        file=str(d["file"]),
                        target=str(d["target"]),
                        backing=str(d["backing"]),
                        backing_format=str(d["backing_format"]),
                        virtual_size=int(d["virtual_size"]),
                    )
                    for d in data["disks"]
                ),
                kernel_id=data.get("kernel_id"),
                ramdisk_id=data.get("ramdisk_id"),
                kernel_base=data.get("kernel_base"),
                ramdisk_base=data.get("ramdisk_base"),
                os_command_line=data.get("os_command_line"),
                spec=dict(data["spec"]) if isinstance(data.get("spec"), dict) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"malformed instance record: {exc!r}") from exc
        if not is_uuid(rec.uuid) or {d.file for d in rec.disks} - {f for f, _ in DISK_TARGETS}:
            raise ValidationError("malformed instance record: bad uuid or disk file name")
        return rec


@dataclass(frozen=True)
class InstanceDir:
    """Paths inside one instance folder."""

    path: Path

    @property
    def uuid(self) -> str:
        return self.path.name

    @property
    def record(self) -> Path:
        return self.path / RECORD

    @property
    def disk_info(self) -> Path:
        return self.path / "disk.info"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def kernel(self) -> Path:
        return self.path / "kernel"

    @property
    def ramdisk(self) -> Path:
        return self.path / "ramdisk"

    def disk(self, file: str) -> Path:
        return self.path / file


# <instances_path>/.names/<name> is a symlink whose target is the UUID that claimed the
# name: read with readlink only (never followed), so checking a name costs no file reads.
NAMES_DIR = ".names"


def name_claim_path(instances_path: Path, name: str) -> Path:
    return instances_path / NAMES_DIR / validate_name(name)


def _claim_target(path: Path) -> str | None:
    try:
        target = os.readlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a symlink (planted file): ignore it
            return None
        raise LocalIOError(f"cannot read name claim {path}: {exc.strerror}") from exc
    return target if is_uuid(target) else None


def name_owner(instances_path: Path, name: str) -> str | None:
    """The UUID of the live instance (or creation in progress) holding ``name``, if any.

    A claim whose folder (final or temporary) is gone is stale and ignored.
    """
    owner = _claim_target(name_claim_path(instances_path, name))
    if owner is None:
        return None
    if (instances_path / owner).is_dir() or (instances_path / f".{owner}.tmp").is_dir():
        return owner
    return None


def claimed_uuids(instances_path: Path) -> set[str]:
    """UUIDs that hold a name claim (stale ones included)."""
    names = instances_path / NAMES_DIR
    try:
        entries = os.listdir(names)
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise LocalIOError(f"cannot list {names}: {exc.strerror}") from exc
    out = set()
    for entry in entries:
        target = _claim_target(names / entry)
        if target is not None:
            out.add(target)
    return out


def write_name_claim(instances_path: Path, name: str, uuid: str) -> Path:
    """Claim ``name`` for ``uuid`` (the caller holds the names lock); returns the claim path."""
    path = name_claim_path(instances_path, name)
    try:
        os.symlink(uuid, path)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.symlink(uuid, path)
    except FileExistsError:  # a stale claim (checked by the caller): replace it atomically
        tmp = path.with_name(f".{name}.{uuid}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(uuid, tmp)
        os.rename(tmp, path)
    return path


def release_name(instances_path: Path, name: str, uuid: str) -> None:
    """Drop the claim of ``name`` if ``uuid`` holds it."""
    path = name_claim_path(instances_path, name)
    if _claim_target(path) == uuid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def new_uuid() -> str:
    return str(uuid_mod.uuid4())


def read_record(folder: Path) -> InstanceRecord:
    path = folder / RECORD
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise NotFoundError(f"instance record missing: {path}", path=str(path)) from exc
    except OSError as exc:
        raise LocalIOError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    except ValueError as exc:
        raise ValidationError(f"instance record {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValidationError(f"instance record {path} is not a JSON object")
    rec = InstanceRecord.from_dict(data)
    if rec.uuid != folder.name:
        raise ValidationError(f"instance record {path} names uuid {rec.uuid}, not {folder.name}")
    return rec


@dataclass(frozen=True)
class FolderEntry:
    """An instance folder; ``record`` is None when instance.json is missing or unreadable."""

    uuid: str
    path: Path
    record: InstanceRecord | None
    problem: str | None = None
    incomplete: bool = False  # a ``.<uuid>.tmp`` folder: creation unfinished


def scan(instances_path: Path) -> list[FolderEntry]:
    """Every ``<uuid>/`` (and unfinished ``.<uuid>.tmp/``) folder under ``instances_path``."""
    try:
        children = sorted(instances_path.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LocalIOError(f"cannot list {instances_path}: {exc.strerror}") from exc
    out: list[FolderEntry] = []
    for child in children:
        tmp_uuid = (
            child.name[1:-4] if child.name.startswith(".") and child.name.endswith(".tmp") else ""
        )
        if is_uuid(tmp_uuid) and child.is_dir():
            # A creation in progress, or one killed half-way: report it, never hide it.
            out.append(
                FolderEntry(
                    tmp_uuid,
                    child,
                    None,
                    problem=f"unfinished creation (temporary folder {child.name}); "
                    "delete it if no 'server create' is running",
                    incomplete=True,
                )
            )
            continue
        if not is_uuid(child.name) or not child.is_dir():
            continue
        try:
            out.append(FolderEntry(child.name, child, read_record(child)))
        except (NotFoundError, ValidationError, LocalIOError) as exc:
            log.warning("instance folder %s: %s", child, exc)
            out.append(FolderEntry(child.name, child, None, problem=str(exc)))
    return out


def find(instances_path: Path, ref: str) -> FolderEntry:
    """The instance named ``ref`` or with UUID ``ref``."""
    entries = scan(instances_path)
    if is_uuid(ref.lower()):
        for e in entries:
            if e.uuid == ref.lower():
                return e
    else:
        matches = [e for e in entries if e.record is not None and e.record.name == ref]
        if len(matches) > 1:
            raise ConflictError(f"several servers are named {ref!r}; use the UUID", name=ref)
        if matches:
            return matches[0]
    raise NotFoundError(f"server {ref!r} not found in {instances_path}", server=ref)
