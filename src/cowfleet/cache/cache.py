"""The node image cache: ``ImageCache.ensure_cached(image_id)``.

Each image is fetched once per node into ``_base``, verified (digest, format
inspection, safety policy) during one streaming pass, and renamed into place
atomically. Concurrent callers (threads or processes) for one image share one
download through the per-base lock; different images download in parallel up
to ``cfg.fetch_concurrency`` per node. See docs/cache.md.

This module holds the hit path and the locking around a fetch; the fetch itself is
:mod:`.fetcher` (engine: :mod:`cowfleet.fetch`), failure sharing :mod:`.failures`,
installing :mod:`.install`, listing :mod:`.listing`, re-verification :mod:`.verify`.
"""

from __future__ import annotations

import builtins
import logging
import os
import random
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from cowfleet.cache import failures
from cowfleet.cache import metadata as md
from cowfleet.cache.fetcher import fetch_base
from cowfleet.cache.layout import BasePaths, Layout, canonical_image_id
from cowfleet.cache.lock import base_lock
from cowfleet.config import Config
from cowfleet.errors import CowfleetError, IntegrityError, LocalIOError
from cowfleet.fetch.engine import InspectorLike
from cowfleet.fetch.retry import BACKOFF, RetryPolicy
from cowfleet.formats.inspection import qemu_format_name

if TYPE_CHECKING:
    from cowfleet.cache.listing import BaseEntry
    from cowfleet.cache.peering import Peering
    from cowfleet.cache.verify import VerifyResult
    from cowfleet.fetch.sources import Peer
    from cowfleet.images.client import Image, ImageClient
    from cowfleet.metrics import NodeMetrics

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
    # When fetched: the source that sent the most bytes ("origin" or a peer's hostname)
    # and the bytes each source sent.
    source: str | None = None
    bytes_by_source: Mapping[str, int] = field(default_factory=dict)


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
        rand: Callable[[], float] = random.random,
        inspector_factory: Callable[[], InspectorLike] = _new_inspector,
        backoff: float = BACKOFF,
        metrics: NodeMetrics | None = None,
        peering: Peering | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.layout = Layout(cfg.instances_path)
        self._client_src = client
        self._client: ImageClient | None = None
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.rand = rand
        self.inspector_factory = inspector_factory
        self.retry = RetryPolicy(
            retries=cfg.fetch_retries, backoff=backoff, deadline=cfg.fetch_deadline
        )
        self.peering = peering  # the node agent's: fetch from peers, serve downloads
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
    def ensure_cached(
        self,
        image_id: str,
        *,
        sources: Sequence[Peer] = (),
        stripes: Sequence[Sequence[Peer]] = (),
    ) -> CachedBase:
        """Return the verified base of ``image_id``, fetching it once per node (from the
        peers in ``sources`` first, when the cache has :attr:`peering`; or from the peers
        of each stripe in ``stripes``, see :mod:`cowfleet.fetch.stripes`)."""
        image_id = canonical_image_id(image_id)
        paths = self.layout.paths(image_id)
        hit = self._hit(image_id, paths)
        if hit is not None:
            if self.metrics is not None:
                self.metrics.hit()
            return hit
        if self.peering is not None:  # peers asking for it meanwhile wait for the download
            with self.peering.live.expect(image_id):
                return self._ensure_missing(image_id, paths, sources, stripes)
        return self._ensure_missing(image_id, paths, sources, stripes)

    def _ensure_missing(
        self,
        image_id: str,
        paths: BasePaths,
        sources: Sequence[Peer],
        stripes: Sequence[Sequence[Peer]] = (),
    ) -> CachedBase:
        self._ensure_dirs()
        waiting_since = self.clock()
        with base_lock(self.layout.locks_dir, paths.name, timeout=self.cfg.fetch_deadline):
            hit = self._hit(image_id, paths)
            if hit is not None:  # another caller fetched it while this one waited
                if self.metrics is not None:
                    self.metrics.hit()
                return hit
            failures.raise_if_failed_since(paths, image_id, waiting_since)
            try:
                result = self._fetch(image_id, paths, sources, stripes)
            except CowfleetError as exc:
                failures.record(paths, image_id, exc, self.clock())
                raise
            failures.clear(paths)
            return result

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

    def _fetch(
        self,
        image_id: str,
        paths: BasePaths,
        sources: Sequence[Peer] = (),
        stripes: Sequence[Sequence[Peer]] = (),
    ) -> CachedBase:
        started = self.monotonic()
        budget = self.retry.start(clock=self.monotonic, sleep=self.sleep, rand=self.rand)
        got = fetch_base(
            self.cfg,
            self.layout,
            self.client,
            image_id,
            paths,
            budget,
            now=self.clock,
            inspector_factory=self.inspector_factory,
            peering=self.peering,
            peers=sources,
            stripes=stripes,
        )
        self.downloads += 1
        seconds = self.monotonic() - started
        log.debug("image %s: fetched in %.2fs", image_id, seconds)
        inst = got.installed
        if self.metrics is not None:
            self.metrics.fetched_from(got.bytes_by_source, got.source, seconds)
        return CachedBase(
            image_id=image_id,
            path=paths.base,
            format=inst.format,
            virtual_size=inst.virtual_size,
            size=inst.size,
            image=got.image,
            fetched=True,
            source=got.source,
            bytes_by_source=got.bytes_by_source,
        )

    # -- list / verify -----------------------------------------------------
    def list(self) -> builtins.list[BaseEntry]:
        from cowfleet.cache.listing import list_entries

        return list_entries(self.layout)

    def verify(self, image_id: str | None = None) -> builtins.list[VerifyResult]:
        from cowfleet.cache.verify import verify_bases

        return verify_bases(
            self.layout,
            image_id,
            lock_timeout=self.cfg.fetch_deadline,
            max_virtual_size=self.cfg.max_virtual_size,
            clock=self.clock,
        )
