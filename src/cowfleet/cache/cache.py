"""The node image cache: ``ImageCache.ensure_cached(image_id)``.

Each image is fetched once per node into ``_base``, verified (digest, format
inspection, safety policy) during one streaming pass, and renamed into place
atomically. Concurrent callers (threads or processes) for one image share one
download through the per-base lock; different images download in parallel up
to ``cfg.fetch_concurrency`` per node. See docs/cache.md.
"""

from __future__ import annotations

import builtins
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from cowfleet import safeopen
from cowfleet.cache import metadata as md
from cowfleet.cache.layout import BasePaths, Layout, canonical_image_id
from cowfleet.cache.lock import SlotLimiter, base_lock
from cowfleet.cache.sink import InspectorLike, PartFile, StreamSink
from cowfleet.config import Config
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    CowfleetError,
    IntegrityError,
    LocalIOError,
    TimeoutError_,
    UnsafeImageError,
    ValidationError,
)
from cowfleet.formats.inspection import GLANCE_DISK_FORMATS, qemu_format_name

if TYPE_CHECKING:
    from cowfleet.cache.listing import BaseEntry
    from cowfleet.cache.verify import VerifyResult
    from cowfleet.formats.inspection import Inspection
    from cowfleet.images.client import Image, ImageClient

log = logging.getLogger(__name__)

RAW_DISK_FORMATS = ("raw", "aki", "ari", "ami")


@dataclass(frozen=True)
class CachedBase:
    """A verified base file ready to back overlays."""

    image_id: str
    path: Path
    format: str  # qemu-img format name of the FILE in _base (pin it in overlays)
    virtual_size: int
    size: int  # apparent size of the base file
    image: Image | None  # the image record when it was fetched now, else None
    fetched: bool  # True when this call downloaded it


@dataclass(frozen=True)
class CachedSet:
    """A root image and the kernel/ramdisk images it names (``kernel_id``/``ramdisk_id``)."""

    root: CachedBase
    kernel: CachedBase | None
    ramdisk: CachedBase | None


def _new_inspector() -> InspectorLike:
    from cowfleet.formats.inspector import Inspector

    inspector: InspectorLike = Inspector()
    return inspector


class ImageCache:
    """The ``_base`` cache of one node (one instances path)."""

    def __init__(
        self,
        cfg: Config,
        client: ImageClient | Callable[[], ImageClient] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        inspector_factory: Callable[[], InspectorLike] = _new_inspector,
        backoff: float = 0.5,
        fast_http: bool = True,
    ) -> None:
        self.cfg = cfg
        self.fast_http = fast_http  # bodies via http.client (see cache/httpbody.py)
        self.layout = Layout(cfg.instances_path)
        self._client_src = client
        self._client: ImageClient | None = None
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.inspector_factory = inspector_factory
        self.backoff = backoff
        self.downloads = 0  # downloads completed by this object (for tests and benches)
        self._dirs_ready = False

    # -- plumbing ---------------------------------------------------------
    @property
    def client(self) -> ImageClient:
        """The image client, created on first use (hits never need it)."""
        client = self._client
        if client is None:
            src = self._client_src
            if src is None:
                from cowfleet.images.client import ImageClient

                client = ImageClient.from_config(self.cfg)
            elif hasattr(src, "open_download"):
                client = cast("ImageClient", src)
            else:
                client = src()
            self._client = client
        return client

    def _ensure_dirs(self) -> None:
        if not self._dirs_ready:
            try:
                self.layout.ensure_dirs()
            except OSError as exc:
                raise LocalIOError(
                    f"cannot create cache directories under {self.layout.instances_path}: "
                    f"{exc.strerror}"
                ) from exc
            self._dirs_ready = True

    # -- the hit path -----------------------------------------------------
    def _hit(self, image_id: str, paths: BasePaths) -> CachedBase | None:
        """The cached base when ``paths.base`` is a verified base of ``image_id``."""
        try:
            st = os.lstat(paths.base)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s is not a regular file (symlink?); it will be replaced", paths.base)
            return None
        meta = md.read_meta(paths.meta)
        if meta is None or meta.image_id != image_id:
            return None
        if meta.state == md.STATE_FAILED:
            raise IntegrityError(
                f"cached base of image {image_id} failed verification "
                f"({meta.failure}); remove it or re-verify with 'cowfleet cache verify'",
                image_id=image_id,
                path=str(paths.base),
            )
        if st.st_size != meta.file_size:
            return None
        md.touch(paths.meta, self.clock())
        return CachedBase(
            image_id=image_id,
            path=paths.base,
            format=qemu_format_name(meta.file_format),
            virtual_size=meta.virtual_size,
            size=meta.file_size,
            image=None,
            fetched=False,
        )

    # -- public API -------------------------------------------------------
    def ensure_cached(self, image_id: str) -> CachedBase:
        """Return the verified base of ``image_id``, fetching it once per node."""
        image_id = canonical_image_id(image_id)
        paths = self.layout.paths(image_id)
        hit = self._hit(image_id, paths)
        if hit is not None:
            return hit
        self._ensure_dirs()
        waiting_since = self.clock()
        with base_lock(self.layout.locks_dir, paths.name, timeout=self.cfg.fetch_deadline):
            hit = self._hit(image_id, paths)
            if hit is not None:
                return hit
            self._raise_shared_failure(image_id, paths, waiting_since)
            try:
                result = self._fetch(image_id, paths)
            except CowfleetError as exc:
                self._record_failure(image_id, paths, exc)
                raise
            md.remove_quietly(paths.failed)
            return result

    def _record_failure(self, image_id: str, paths: BasePaths, exc: CowfleetError) -> None:
        record = md.FailureRecord(image_id, type(exc).__name__, str(exc), self.clock())
        try:
            md.write_atomic(paths.failed, record.to_json(), durable=False)
        except CowfleetError as werr:  # e.g. the disk is full: nothing to share then
            log.debug("cannot record the failure: %s", werr)

    def _raise_shared_failure(self, image_id: str, paths: BasePaths, since: float) -> None:
        """A fetch that failed while we waited for the lock is not repeated by every waiter."""
        record = md.read_failure(paths.failed)
        if record is None or record.image_id != image_id or record.at < since:
            return
        from cowfleet import errors

        cls = getattr(errors, record.error, None)
        if not (isinstance(cls, type) and issubclass(cls, CowfleetError)):
            cls = CowfleetError
        raise cls(
            f"{record.message} (fetched by another caller while this one waited)", image_id=image_id
        )

    def ensure_cached_with_deps(self, image_id: str) -> CachedSet:
        """Cache an image and its ``kernel_id``/``ramdisk_id`` images (same verified path)."""
        root = self.ensure_cached(image_id)
        if root.image is not None:
            kernel_id = root.image.properties.get("kernel_id")
            ramdisk_id = root.image.properties.get("ramdisk_id")
        else:
            meta = md.read_meta(self.layout.paths(root.image_id).meta)
            kernel_id = meta.kernel_id if meta else None
            ramdisk_id = meta.ramdisk_id if meta else None
        kernel = self.ensure_cached(kernel_id) if kernel_id else None
        ramdisk = self.ensure_cached(ramdisk_id) if ramdisk_id else None
        return CachedSet(root=root, kernel=kernel, ramdisk=ramdisk)

    # -- the fetch path (under the base lock) ------------------------------
    def _validate_image(self, image: Image) -> tuple[str, str, str, int]:
        """(disk_format, hash_algo, hash_value, size) of a fetchable image."""
        iid = image.id
        if image.status != "active":
            raise ConflictError(f"image {iid} is {image.status}, not active", image_id=iid)
        disk_format = (image.disk_format or "").lower()
        if disk_format not in GLANCE_DISK_FORMATS:
            raise UnsafeImageError(
                f"image {iid} has unsupported disk_format {image.disk_format!r}", image_id=iid
            )
        if image.size is None or image.size < 0:
            raise ValidationError(f"image {iid} declares no size", image_id=iid)
        if image.size > self.cfg.max_image_size:
            raise ValidationError(
                f"image {iid} is {image.size} bytes, over the limit of {self.cfg.max_image_size}",
                image_id=iid,
            )
        if image.os_hash_algo and image.os_hash_value:
            algo, value = image.os_hash_algo, image.os_hash_value
        elif image.checksum:
            algo, value = "md5", image.checksum
        else:
            raise IntegrityError(
                f"image {iid} has no checksum (os_hash_value or checksum); refusing to "
                "cache data that cannot be verified",
                image_id=iid,
            )
        return disk_format, algo.lower(), value.lower(), image.size

    def _fetch(self, image_id: str, paths: BasePaths) -> CachedBase:
        client = self.client
        deadline = self.monotonic() + self.cfg.fetch_deadline
        image = self._get_image(client, image_id, deadline)
        disk_format, algo, value, size = self._validate_image(image)
        limiter = SlotLimiter(self.layout.locks_dir, self.cfg.fetch_concurrency)
        dir_fd = safeopen.open_dir(self.layout.base_dir)
        started = self.monotonic()
        try:
            with limiter.hold(deadline=deadline):
                part = self._claim_part(dir_fd, paths, image_id, size, algo, value)
                sink: StreamSink | None = None
                from cowfleet.cache import httpbody

                reader = httpbody.from_client(client) if self.fast_http else None
                try:
                    sink = StreamSink(
                        part,
                        image_id=image_id,
                        expected_size=size,
                        hash_algo=algo,
                        hash_value=value,
                        inspector_factory=self.inspector_factory,
                        release=httpbody.release if reader is not None else None,
                    )
                    if part.position:
                        sink.absorb_prefix()
                        log.info("image %s: resuming at byte %d", image_id, sink.offset)
                    from cowfleet.cache.fetch import download_into

                    body_source = reader or client
                    stats = download_into(
                        sink,
                        body_source,
                        retries=self.cfg.fetch_retries,
                        deadline=deadline,
                        clock=self.monotonic,
                        sleep=self.sleep,
                        backoff=self.backoff,
                    )
                    inspection = sink.finish()
                finally:
                    if sink is not None:
                        sink.close()
                    part.close()
            self._check_policy(image_id, disk_format, inspection)
            if inspection.format == "qcow2":
                from cowfleet.formats.qcow2_tables import check_file

                # The stream judged the header; the tables' entries need the whole file.
                check_file(paths.part.name, dir_fd=dir_fd, image_id=image_id)
            result = self._install(dir_fd, paths, image, disk_format, algo, value, inspection)
        except (BackendUnavailableError, TimeoutError_):
            # Transport trouble: keep the .part and its record for a later resume.
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._discard(dir_fd, paths)
            if isinstance(exc, CowfleetError):
                log.warning("image %s: fetch refused: %s", image_id, exc)
            raise
        finally:
            os.close(dir_fd)
        self.downloads += 1
        seconds = self.monotonic() - started
        log.info(
            "image %s: cached %s (%d bytes, %d attempts, resumed from %d, %.2fs)",
            image_id,
            paths.base,
            size,
            stats.attempts,
            stats.resumed_from,
            seconds,
        )
        return result

    def _get_image(self, client: ImageClient, image_id: str, deadline: float) -> Image:
        """The image record, retrying transient failures like the download does."""
        delay = self.backoff
        for attempt in range(self.cfg.fetch_retries + 1):
            try:
                return client.get(image_id)
            except (BackendUnavailableError, TimeoutError_) as exc:
                if attempt == self.cfg.fetch_retries or self.monotonic() + delay > deadline:
                    raise
                log.warning("image %s: %s; retrying in %.1fs", image_id, exc, delay)
                self.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _claim_part(
        self, dir_fd: int, paths: BasePaths, image_id: str, size: int, algo: str, value: str
    ) -> PartFile:
        """Resume a matching ``.part`` we now own (we hold the lock) or create a new one."""
        part_name = paths.part.name
        record = md.read_part_meta(paths.part_meta)
        try:
            st: os.stat_result | None = os.lstat(paths.part)
        except FileNotFoundError:
            st = None
        source = self.cfg.endpoint
        if (
            st is not None
            and stat.S_ISREG(st.st_mode)
            and record is not None
            and record.image_id == image_id
            and record.image_size == size
            and record.hash_algo == algo
            and record.hash_value == value
        ):
            try:
                return PartFile.reopen(dir_fd, part_name, str(paths.part))
            except LocalIOError as exc:
                log.warning("cannot resume %s (%s); starting over", paths.part, exc)
        if st is not None:
            log.info("removing stale %s", paths.part)
            _unlink_at(dir_fd, part_name)
        md.write_atomic(
            paths.part_meta,
            md.PartMeta(
                image_id=image_id,
                image_size=size,
                hash_algo=algo,
                hash_value=value,
                source=source,
                started_at=self.clock(),
            ).to_json(),
        )
        return PartFile.create(dir_fd, part_name, str(paths.part))

    def _check_policy(self, image_id: str, disk_format: str, inspection: Inspection) -> None:
        from cowfleet.formats import policy

        verdict = policy.check(disk_format, inspection, max_virtual_size=self.cfg.max_virtual_size)
        verdict.raise_if_unsafe(image_id=image_id)

    def _install(
        self,
        dir_fd: int,
        paths: BasePaths,
        image: Image,
        disk_format: str,
        algo: str,
        value: str,
        inspection: Inspection,
    ) -> CachedBase:
        file_format = GLANCE_DISK_FORMATS[disk_format]
        src_name = paths.part.name
        file_algo, file_value = algo, value
        converted_from: str | None = None
        virtual_size = inspection.virtual_size
        if self.cfg.force_raw and file_format != "raw":
            from cowfleet.cache.convert import to_raw

            conv = to_raw(paths, dir_fd, file_format, self.cfg.max_virtual_size, image.id)
            src_name = paths.converted.name
            converted_from, file_format = file_format, "raw"
            file_algo, file_value = "sha512", conv.sha512
            virtual_size = conv.virtual_size
        file_size = os.stat(src_name, dir_fd=dir_fd, follow_symlinks=False).st_size
        now = self.clock()
        props = image.properties or {}
        meta = md.BaseMeta(
            image_id=image.id,
            name=image.name,
            disk_format=disk_format,
            file_format=file_format,
            image_size=image.size or 0,
            file_size=file_size,
            virtual_size=virtual_size,
            hash_algo=algo,
            hash_value=value,
            file_hash_algo=file_algo,
            file_hash_value=file_value,
            fetched_at=now,
            source=self.cfg.endpoint,
            verified_at=now,
            converted_from=converted_from,
            kernel_id=props.get("kernel_id"),
            ramdisk_id=props.get("ramdisk_id"),
        )
        # Metadata first, then the rename: a base never exists without its record.
        md.write_meta(paths.meta, meta)
        try:
            os.rename(src_name, paths.base.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            raise LocalIOError(f"cannot install {paths.base}: {exc.strerror}") from exc
        if converted_from:
            _unlink_at(dir_fd, paths.part.name)
        md.remove_quietly(paths.part_meta)
        return CachedBase(
            image_id=image.id,
            path=paths.base,
            format=qemu_format_name(file_format),
            virtual_size=virtual_size,
            size=file_size,
            image=image,
            fetched=True,
        )

    def _discard(self, dir_fd: int, paths: BasePaths) -> None:
        for name in (paths.part.name, paths.converted.name):
            _unlink_at(dir_fd, name)
        md.remove_quietly(paths.part_meta)

    # -- list / verify -----------------------------------------------------
    def list(self) -> builtins.list[BaseEntry]:
        from cowfleet.cache.listing import list_entries

        return list_entries(self.layout)

    def verify(self, image_id: str | None = None) -> builtins.list[VerifyResult]:
        from cowfleet.cache.verify import verify_bases

        return verify_bases(self, image_id)


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", name, exc)
