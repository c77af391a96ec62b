"""``server create``: validate, cache the image, build the instance folder, boot.

Order of work (each failure is a clear error and leaves no instance behind):

1. validate name, flavor, image (active, not a kernel/ramdisk), sizes
   (root disk >= image virtual size, min_disk, min_ram), name free on the node;
2. ``ensure_cached`` the image and its kernel/ramdisk images;
3. build ``<instances_path>/.<uuid>.tmp/`` -- overlays, disk.info, console.log,
   kernel/ramdisk copies, instance.json -- and rename it to ``<uuid>/``;
4. define and start the domain through the driver.

A failure after step 2 removes the half-made folder (and domain); bases are
only ever read, never removed or rewritten here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cowfleet import proc
from cowfleet.compute import instance as inst
from cowfleet.compute.disks import reinspect_base, write_overlay
from cowfleet.compute.domain_xml import BackingSpec, DiskSpec, DomainSpec
from cowfleet.compute.drivers.base import Driver
from cowfleet.compute.ephemeral import (
    LockFactory,
    ensure_ephemeral_base,
    ensure_swap_base,
    ephemeral_base_name,
    swap_base_name,
)
from cowfleet.compute.flavors import GIB, Flavor, get_flavor
from cowfleet.config import Config
from cowfleet.errors import (
    ConflictError,
    CowfleetError,
    LocalIOError,
    NotFoundError,
    StorageFullError,
    ValidationError,
)

log = logging.getLogger(__name__)

NAMES_LOCK = "instance-names"
DIR_MODE = 0o711  # qemu's user must traverse it; listing is not needed
FILE_MODE = 0o600  # libvirt chowns the instance's own files to qemu while it runs
DEFAULT_CMDLINE = "root=/dev/vda console=ttyS0"  # kernel boots without os_command_line
KERNEL_FORMATS = {"kernel_id": "aki", "ramdisk_id": "ari"}


class ImageLike(Protocol):
    """The fields of a Glance image record that provisioning reads."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def status(self) -> str: ...
    @property
    def disk_format(self) -> str | None: ...
    @property
    def virtual_size(self) -> int | None: ...
    @property
    def min_disk(self) -> int: ...
    @property
    def min_ram(self) -> int: ...
    @property
    def properties(self) -> Mapping[str, str]: ...


class ImageLookup(Protocol):
    def find(self, name_or_id: str) -> ImageLike: ...
    def get(self, image_id: str) -> ImageLike: ...


class CachedBaseLike(Protocol):
    @property
    def path(self) -> Path: ...
    @property
    def format(self) -> str: ...
    @property
    def virtual_size(self) -> int: ...


class BaseCache(Protocol):
    def ensure_cached(self, image_id: str) -> CachedBaseLike: ...


PinFactory = Callable[[Path, Iterable[str]], AbstractContextManager[None]]


def _default_pin(locks_dir: Path, names: Iterable[str]) -> AbstractContextManager[None]:
    from cowfleet.cache import pins

    return pins.hold(locks_dir, names)


def _default_lock() -> LockFactory:
    from cowfleet.cache.lock import base_lock

    def factory(locks_dir: Path, name: str) -> AbstractContextManager[None]:
        return base_lock(locks_dir, name)

    return factory


@dataclass(frozen=True)
class Plan:
    """Everything validated before any file is written."""

    name: str
    flavor: Flavor
    image: ImageLike
    kernel: ImageLike | None
    ramdisk: ImageLike | None
    cmdline: str | None


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n % GIB else f"{n // GIB} GiB"


class Provisioner:
    """Creates instances on one node. Every collaborator is injected."""

    def __init__(
        self,
        cfg: Config,
        *,
        images: ImageLookup,
        cache: BaseCache,
        driver: Driver,
        lock: LockFactory | None = None,
        pin: PinFactory = _default_pin,
        clock: Callable[[], float] = time.time,
        new_uuid: Callable[[], str] = inst.new_uuid,
        runner: Callable[..., proc.Completed] = proc.run,
        durable: bool = True,
        reinspect_bases: bool = True,
        observe: Callable[[str, float], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        # Build phases (fetch, disks, hypervisor) and their seconds, for metrics.
        self.observe = observe
        self.monotonic = monotonic
        self.images = images
        self.cache = cache
        self.driver = driver
        self.lock = lock or _default_lock()
        self.pin = pin
        self.clock = clock
        self.new_uuid = new_uuid
        self.runner = runner
        self.durable = durable
        # Re-inspect an image base (head reads + safety policy) on every use, so a base
        # altered after the cache verified it is refused; cowfleet's own ephemeral/swap
        # bases are trusted.
        self.reinspect_bases = reinspect_bases
        self._pool: ThreadPoolExecutor | None = None
        self._pool_guard = threading.Lock()  # one Provisioner serves concurrent builds

    # validation -------------------------------------------------------------
    def plan(self, name: str, image_ref: str, flavor_ref: str | Flavor) -> Plan:
        """Validate a request; ``flavor_ref`` is a flavor name or a whole flavor (a
        controller's build spec carries the flavor itself)."""
        inst.validate_name(name)
        flavor = flavor_ref if isinstance(flavor_ref, Flavor) else get_flavor(self.cfg, flavor_ref)
        image = self.images.find(image_ref)
        self._check_active(image, "image")
        if image.disk_format in ("aki", "ari"):
            raise ValidationError(
                f"image {image.id} is a {image.disk_format} (kernel/ramdisk) image, "
                "not a disk: boot an image whose kernel_id/ramdisk_id point to it",
                image_id=image.id,
            )
        if image.disk_format is None:
            raise ValidationError(f"image {image.id} has no disk_format", image_id=image.id)
        if image.min_disk and flavor.root_gb and image.min_disk > flavor.root_gb:
            raise ValidationError(
                f"flavor {flavor.name} root disk {flavor.root_gb} GiB is below the image's "
                f"min_disk {image.min_disk} GiB",
                image_id=image.id,
                flavor=flavor.name,
            )
        if image.min_ram and image.min_ram > flavor.ram_mb:
            raise ValidationError(
                f"flavor {flavor.name} memory {flavor.ram_mb} MiB is below the image's "
                f"min_ram {image.min_ram} MiB",
                image_id=image.id,
                flavor=flavor.name,
            )
        if image.virtual_size is not None:
            self._check_root_size(flavor, image.id, image.virtual_size)
        linked: dict[str, ImageLike | None] = {}
        for prop, fmt in KERNEL_FORMATS.items():
            ref = image.properties.get(prop)
            if not ref:
                linked[prop] = None
                continue
            other = self.images.get(ref)
            self._check_active(other, prop)
            if other.disk_format != fmt:
                raise ValidationError(
                    f"image {image.id} property {prop}={ref} names a {other.disk_format} "
                    f"image, expected {fmt}",
                    image_id=image.id,
                )
            linked[prop] = other
        if linked["ramdisk_id"] is not None and linked["kernel_id"] is None:
            raise ValidationError(
                f"image {image.id} has a ramdisk_id but no kernel_id", image_id=image.id
            )
        self._check_name_free(name)
        cmdline = image.properties.get("os_command_line") or None
        if linked["kernel_id"] is not None and cmdline is None:
            cmdline = DEFAULT_CMDLINE
        return Plan(name, flavor, image, linked["kernel_id"], linked["ramdisk_id"], cmdline)

    @staticmethod
    def _check_active(image: ImageLike, what: str) -> None:
        if image.status != "active":
            raise ConflictError(
                f"{what} {image.id} is not active (status {image.status})",
                image_id=image.id,
                status=image.status,
            )

    @staticmethod
    def _check_root_size(flavor: Flavor, image_id: str, virtual_size: int) -> None:
        if flavor.root_gb and flavor.root_bytes < virtual_size:
            raise ValidationError(
                f"flavor {flavor.name} root disk ({flavor.root_gb} GiB) is smaller than the "
                f"virtual size of image {image_id} ({_gib(virtual_size)})",
                image_id=image_id,
                flavor=flavor.name,
                virtual_size=virtual_size,
            )

    def _check_name_free(self, name: str) -> None:
        path = self.cfg.instances_path
        owner = inst.name_owner(path, name)
        if owner is not None:
            raise ConflictError(f"a server named {name!r} already exists ({owner})", name=name)
        # The folders are the truth: a folder without a claim (restored by hand, made by
        # an older cowfleet) is read; claimed folders are known by their claim.
        claimed = inst.claimed_uuids(path)
        try:
            children = os.listdir(path)
        except FileNotFoundError:
            return
        for child in children:
            if child in claimed or not inst.is_uuid(child):
                continue
            try:
                rec = inst.read_record(path / child)
            except (NotFoundError, ValidationError, LocalIOError):
                continue
            if rec.name == name:
                raise ConflictError(f"a server named {name!r} already exists ({child})", name=name)

    # creation ---------------------------------------------------------------
    def create(
        self,
        name: str,
        image_ref: str,
        flavor_ref: str | Flavor,
        *,
        start: bool = True,
        uuid: str | None = None,
        spec: dict[str, Any] | None = None,
        sources: Sequence[Any] = (),
        stripes: Sequence[Sequence[Any]] = (),
    ) -> inst.InstanceRecord:
        """Validate, cache, build the folder, define (and start) the domain.

        ``sources``: peers (:class:`cowfleet.fetch.sources.Peer`) to fetch the root
        image from before the origin, as the controller assigned them; ``stripes``:
        the peers of each stripe when it planned the fetch in stripes
        (:mod:`cowfleet.fetch.stripes`).

        ``uuid``: the instance's UUID when the caller chose it (a controller's build
        request); a new one otherwise. ``spec``: the controller's build spec, kept in
        ``instance.json`` so a repeated request can be told from a different one.
        """
        plan = self.plan(name, image_ref, flavor_ref)
        # The pins keep the cache manager off these bases until the folder naming them
        # is in place (see cowfleet.cache.pins).
        with self.pin_bases(plan):
            started = self.monotonic()
            peers: dict[str, Any] = {"sources": sources} if sources else {}
            if stripes:
                peers["stripes"] = stripes
            root = self.cache.ensure_cached(plan.image.id, **peers)
            self._check_root_size(plan.flavor, plan.image.id, root.virtual_size)
            kernel = self.cache.ensure_cached(plan.kernel.id) if plan.kernel else None
            ramdisk = self.cache.ensure_cached(plan.ramdisk.id) if plan.ramdisk else None
            self._phase("fetch", started)
            return self.build(plan, root, kernel, ramdisk, start=start, uuid=uuid, spec=spec)

    def base_names(self, plan: Plan) -> list[str]:
        """The ``_base`` file names an instance of ``plan`` uses."""
        from cowfleet.cache.layout import base_name

        names = [base_name(i.id) for i in (plan.image, plan.kernel, plan.ramdisk) if i]
        if plan.flavor.ephemeral_gb > 0:
            names.append(ephemeral_base_name(plan.flavor.ephemeral_gb, self.cfg.ephemeral_fs))
        if plan.flavor.swap_mb > 0:
            names.append(swap_base_name(plan.flavor.swap_mb))
        return names

    def pin_bases(self, plan: Plan) -> AbstractContextManager[None]:
        """Pin every base ``plan`` uses, from before its lookup until the folder is in place."""
        return self.pin(self.cfg.locks_dir, self.base_names(plan))

    def _local_bases(self, flavor: Flavor) -> list[tuple[str, CachedBaseLike]]:
        out: list[tuple[str, CachedBaseLike]] = []
        cfg = self.cfg
        if flavor.ephemeral_gb > 0:
            eph = ensure_ephemeral_base(
                cfg.base_dir,
                cfg.locks_dir,
                flavor.ephemeral_gb,
                cfg.ephemeral_fs,
                lock=self.lock,
                runner=self.runner,
            )
            out.append(("disk.local", eph))
        if flavor.swap_mb > 0:
            swap = ensure_swap_base(
                cfg.base_dir, cfg.locks_dir, flavor.swap_mb, lock=self.lock, runner=self.runner
            )
            out.append(("disk.swap", swap))
        return out

    def build(
        self,
        plan: Plan,
        root: CachedBaseLike,
        kernel: CachedBaseLike | None = None,
        ramdisk: CachedBaseLike | None = None,
        *,
        start: bool = True,
        uuid: str | None = None,
        spec: dict[str, Any] | None = None,
    ) -> inst.InstanceRecord:
        """Write the instance folder for ``plan`` on cached bases and hand it to the driver."""
        cfg = self.cfg
        targets = dict(inst.DISK_TARGETS)
        bases: list[tuple[str, CachedBaseLike]] = [("disk", root), *self._local_bases(plan.flavor)]
        trusted = {"disk.local", "disk.swap"} if self.reinspect_bases else set(targets)
        if uuid is None:
            uuid = self.new_uuid()
        elif not inst.is_uuid(uuid):
            raise ValidationError(f"invalid instance uuid {uuid!r}")
        final = cfg.instances_path / uuid
        tmp = cfg.instances_path / f".{uuid}.tmp"
        created_at = datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="seconds")
        disks: list[inst.DiskRecord] = []
        made = renamed = defined = False
        claim: Path | None = None
        started = self.monotonic()
        try:
            try:
                try:
                    os.mkdir(tmp, DIR_MODE)
                except FileNotFoundError:  # the first instance on this node
                    cfg.instances_path.mkdir(parents=True, exist_ok=True)
                    os.mkdir(tmp, DIR_MODE)
                made = True
                os.chmod(tmp, DIR_MODE)  # umask-proof
            except FileExistsError as exc:
                raise ConflictError(f"instance folder {tmp} already exists") from exc
            if os.path.lexists(final):  # a caller-chosen uuid that exists already
                raise ConflictError(f"instance {uuid} already exists", server=uuid)
            for file, base in bases:
                vsize = base.virtual_size
                if file not in trusted:
                    vsize = reinspect_base(
                        base.path, base.format, max_virtual_size=cfg.max_virtual_size
                    )
                    self._check_root_size(plan.flavor, plan.image.id, vsize)
                size = plan.flavor.root_bytes if file == "disk" else vsize
                written = write_overlay(
                    tmp / file, base.path, base.format, max(size, vsize), backing_virtual_size=vsize
                )
                disks.append(
                    inst.DiskRecord(
                        file=file,
                        target=targets[file],
                        backing=str(base.path),
                        backing_format=base.format,
                        virtual_size=written,
                    )
                )
            info = {str(final / d.file): "qcow2" for d in disks}
            self._write(tmp / "disk.info", json.dumps(info) + "\n")
            self._write(tmp / "console.log", "")
            for src, dest in ((kernel, "kernel"), (ramdisk, "ramdisk")):
                if src is not None:
                    shutil.copyfile(src.path, tmp / dest)
                    os.chmod(tmp / dest, FILE_MODE)
            record = inst.InstanceRecord(
                uuid=uuid,
                name=plan.name,
                created_at=created_at,
                driver=self.driver.name,
                virt_type=cfg.virt_type,
                image_id=plan.image.id,
                image_name=plan.image.name,
                image_disk_format=plan.image.disk_format,
                flavor=plan.flavor,
                disks=tuple(disks),
                kernel_id=plan.kernel.id if plan.kernel else None,
                ramdisk_id=plan.ramdisk.id if plan.ramdisk else None,
                kernel_base=str(kernel.path) if kernel else None,
                ramdisk_base=str(ramdisk.path) if ramdisk else None,
                os_command_line=plan.cmdline,
                spec=spec,
            )
            self._write(tmp / inst.RECORD, json.dumps(record.to_dict()) + "\n")
            if self.durable:
                # fsyncs issued together after all writes share journal commits:
                # cheaper than one fsync per file as it is written.
                self._fsync_all([tmp / c for c in os.listdir(tmp)] + [tmp])
            with self.lock(cfg.locks_dir, NAMES_LOCK):
                owner = inst.name_owner(cfg.instances_path, plan.name)
                if owner is not None:
                    raise ConflictError(
                        f"a server named {plan.name!r} already exists ({owner})", name=plan.name
                    )
                claim = inst.write_name_claim(cfg.instances_path, plan.name, uuid)
                os.rename(tmp, final)
                renamed = True
            if self.durable:  # the rename is the commit point (the claim is only a hint)
                _fsync_path(cfg.instances_path)
            started = self._phase("disks", started)
            self.driver.define(domain_spec(cfg, record))
            defined = True
            if start and self.driver.can_run:
                self.driver.start(uuid)
            self._phase("hypervisor", started)
        except BaseException as exc:
            self._rollback(
                tmp if made else None, final if renamed else None, uuid if defined else None
            )
            if claim is not None:
                inst.release_name(cfg.instances_path, plan.name, uuid)
            if isinstance(exc, OSError):
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                cls = StorageFullError if full else LocalIOError
                raise cls(f"cannot create instance {plan.name}: {exc}", name=plan.name) from exc
            raise
        log.info(
            "created server %s (%s) from image %s, flavor %s, driver %s",
            plan.name,
            uuid,
            plan.image.id,
            plan.flavor.name,
            self.driver.name,
        )
        return record

    def _phase(self, phase: str, started: float) -> float:
        """Report ``phase`` as lasting since ``started``; the time now (the next start)."""
        now = self.monotonic()
        if self.observe is not None:
            self.observe(phase, now - started)
        return now

    def _fsync_all(self, paths: list[Path]) -> None:
        with self._pool_guard:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
            pool = self._pool
        for future in [pool.submit(_fsync_path, p) for p in paths]:
            future.result()

    def close(self) -> None:
        with self._pool_guard:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def __enter__(self) -> Provisioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _write(path: Path, text: str) -> None:
        # os.write, not a text file object: the small files need no buffering layer.
        data = text.encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _rollback(self, tmp: Path | None, final: Path | None, defined_uuid: str | None) -> None:
        if defined_uuid is not None:
            try:
                self.driver.undefine(defined_uuid)
            except CowfleetError as exc:
                log.error("rollback: cannot undefine domain %s: %s", defined_uuid, exc)
        for folder in (tmp, final):
            if folder is not None:
                _remove_instance_dir(folder)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_instance_dir(folder: Path) -> None:
    """Remove an instance folder. Never follows links out of it (bases stay untouched)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)


def domain_spec(cfg: Config, record: inst.InstanceRecord) -> DomainSpec:
    """The domain definition of an instance, from its record."""
    folder = inst.InstanceDir(cfg.instances_path / record.uuid)
    disks = tuple(
        DiskSpec(
            target=d.target,
            path=folder.disk(d.file),
            format="qcow2",
            backing=(BackingSpec(Path(d.backing), d.backing_format, shared=True),),
        )
        for d in record.disks
    )
    return DomainSpec(
        name=record.name,
        uuid=record.uuid,
        virt_type=record.virt_type,
        memory_mb=record.flavor.ram_mb,
        vcpus=record.flavor.vcpus,
        disks=disks,
        console_log=folder.console_log,
        kernel=folder.kernel if record.kernel_base else None,
        initrd=folder.ramdisk if record.ramdisk_base else None,
        cmdline=record.os_command_line,
        instances_path=cfg.instances_path,
        image_id=record.image_id,
        flavor=record.flavor.name,
    )
