"""Fetching one image into ``_base`` (called under its base lock).

The image record is read and judged (active, a known disk format, a size within the
limit, a digest to verify with); its hash tree, when it publishes one, is fetched and
checked against the published root and then preferred to the digest; a download slot
is taken, the ``.part`` is claimed
(:mod:`.basesink`) and filled by the fetch engine (:mod:`cowfleet.fetch.engine`),
then checked and installed (:mod:`.install`). Transport trouble keeps the ``.part``
and its record for a later resume; any other failure removes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cowfleet import safeopen
from cowfleet.cache import install
from cowfleet.cache import metadata as md
from cowfleet.cache.basesink import claim_part
from cowfleet.cache.layout import BasePaths, Layout
from cowfleet.cache.lock import SlotLimiter
from cowfleet.config import Config
from cowfleet.digest import image_digest, verifier_for
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    CowfleetError,
    IntegrityError,
    TimeoutError_,
    UnsafeImageError,
    ValidationError,
)
from cowfleet.fetch.engine import InspectorLike, OpenStream, Sink, Want, fetch
from cowfleet.fetch.retry import Budget
from cowfleet.formats.inspection import GLANCE_DISK_FORMATS

if TYPE_CHECKING:
    from cowfleet.cache.live import LiveFetch
    from cowfleet.cache.peering import Peering
    from cowfleet.fetch.sources import Peer, Sources
    from cowfleet.fetch.stripes import StripedSources
    from cowfleet.images.client import Image, ImageClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetchable:
    """An image record judged fit to fetch."""

    disk_format: str
    digest: tuple[str, str]  # (algorithm, hex) recorded in the base's metadata
    size: int


def judge(image: Image, max_image_size: int) -> Fetchable:
    """Refuse an image the cache must not fetch (see the module doc)."""
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
    if image.size > max_image_size:
        raise ValidationError(
            f"image {iid} is {image.size} bytes, over the limit of {max_image_size}",
            image_id=iid,
        )
    digest = image_digest(image.os_hash_algo, image.os_hash_value, image.checksum)
    if digest is None:
        raise IntegrityError(
            f"image {iid} has no checksum (os_hash_value or checksum); refusing to "
            "cache data that cannot be verified",
            image_id=iid,
        )
    return Fetchable(disk_format, digest, image.size)


@dataclass(frozen=True)
class FetchedBase:
    image: Image
    installed: install.Installed
    # Checked bytes each source sent in this fetch ("origin" or a peer's hostname) and
    # the source that sent the most: what the node's metrics and pre-cache report use.
    bytes_by_source: Mapping[str, int] = field(default_factory=dict)
    source: str = "origin"


def fetch_base(
    cfg: Config,
    layout: Layout,
    client: ImageClient,
    image_id: str,
    paths: BasePaths,
    budget: Budget,
    *,
    now: Callable[[], float],
    inspector_factory: Callable[[], InspectorLike],
    peering: Peering | None = None,
    peers: Sequence[Peer] = (),
    stripes: Sequence[Sequence[Peer]] = (),
) -> FetchedBase:
    """Fetch, verify, check and install ``image_id`` (see the module doc); with
    ``peering`` and a hash tree, from ``peers`` first (see :mod:`.peering`), or each
    stripe from its own peers when ``stripes`` names them (:mod:`cowfleet.fetch.stripes`)."""
    image = budget.call(lambda: client.get(image_id), what=f"image {image_id}")
    ok = judge(image, cfg.max_image_size)
    # The hash tree when the image has one (checked against its published root), else
    # the whole-image digest (real Glance).
    tree = budget.call(lambda: client.get_tree(image), what=f"hash tree of image {image_id}")
    want = Want(image_id, ok.size, verifier_for(image_id, ok.digest, tree))
    limiter = SlotLimiter(layout.locks_dir, cfg.fetch_concurrency)
    dir_fd = safeopen.open_dir(layout.base_dir)
    # A download peers may read as it lands: ended once the base is installed (a reader
    # arriving in between finds the live entry, after it the base).
    live: LiveFetch | None = None
    sources: Sources | StripedSources | None = None
    installed_ok = False
    try:
        with limiter.hold(deadline=budget.deadline):
            record = md.PartMeta(
                image_id=image_id,
                image_size=ok.size,
                hash_algo=ok.digest[0],
                hash_value=ok.digest[1],
                source=cfg.endpoint,
                started_at=now(),
            )
            sink = claim_part(dir_fd, paths, record, inspector_factory)
            try:
                open_stream: OpenStream = lambda offset, pool: client.open_download(  # noqa: E731
                    image_id, offset=offset, buffers=pool
                )
                into: Sink = sink
                if peering is not None and tree is not None and stripes:
                    from cowfleet.cache.live import TrackingSink
                    from cowfleet.cache.peerstripes import striped_sources
                    from cowfleet.digest import tree_and_digest

                    def on_stripe_switch(name: str) -> None:
                        if live is not None:
                            live.source = name

                    sources = striped_sources(
                        peering, client, image_id, tree, stripes, on_switch=on_stripe_switch
                    )
                    open_stream = sources
                    # Bytes from peers: the digest runs too; the tree check takes the
                    # leaves the stripes' readers passed without hashing them again.
                    want = Want(
                        image_id,
                        ok.size,
                        tree_and_digest(image_id, ok.digest, tree, checked_by=sources.checker),
                    )
                    live = peering.live.begin(image_id, ok.size, sink.fd)
                    live.source = sources.main
                    into = TrackingSink(sink, live)
                elif peering is not None and tree is not None:
                    from cowfleet.cache.live import TrackingSink
                    from cowfleet.digest import tree_and_digest
                    from cowfleet.fetch.sources import OriginSource, Sources

                    chain = peering.sources(image_id, peers, OriginSource(open_stream))

                    def on_switch(name: str) -> None:
                        if live is not None:
                            live.source = name

                    sources = Sources(
                        chain,
                        tree,
                        image_id,
                        on_corrupt=peering.corrupt(image_id),
                        on_switch=on_switch,
                    )
                    open_stream = sources
                    # The tree check takes the leaves Sources passed without hashing them again.
                    checker = sources.checker
                    want = Want(
                        image_id, ok.size, verifier_for(image_id, None, tree, checked_by=checker)
                    )
                    if len(chain) > 1:  # bytes from peers: the digest runs too
                        digest = tree_and_digest(image_id, ok.digest, tree, checked_by=checker)
                        want = Want(image_id, ok.size, digest)
                    live = peering.live.begin(image_id, ok.size, sink.fd)
                    live.source = sources.current.name
                    into = TrackingSink(sink, live)
                elif peers:
                    log.info("image %s: no hash tree to check peers' pieces; origin only", image_id)
                done = fetch(open_stream, into, want, budget)
            finally:
                sink.close()
        assert done.inspection is not None
        install.check(
            dir_fd,
            paths,
            image_id,
            ok.disk_format,
            done.inspection,
            max_virtual_size=cfg.max_virtual_size,
        )
        installed = install.install(
            dir_fd,
            paths,
            image,
            disk_format=ok.disk_format,
            digest=ok.digest,
            inspection=done.inspection,
            force_raw=cfg.force_raw,
            max_virtual_size=cfg.max_virtual_size,
            source=cfg.endpoint,
            now=now(),
        )
        installed_ok = True
    except (BackendUnavailableError, TimeoutError_):
        # Transport trouble: keep the .part and its record for a later resume.
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        install.discard(dir_fd, paths)
        if isinstance(exc, CowfleetError):
            log.warning("image %s: fetch refused: %s", image_id, exc)
        raise
    finally:
        if live is not None:
            assert peering is not None
            peering.live.end(live, installed_ok)
        os.close(dir_fd)
    log.info(
        "image %s: cached %s (%d bytes, %d attempts, resumed from %d (%d not re-read), "
        "verified with %s)",
        image_id,
        paths.base,
        ok.size,
        done.attempts,
        done.resumed_from,
        done.skipped,
        done.verified_with,
    )
    if sources is None:
        return FetchedBase(image, installed, {"origin": ok.size}, "origin")
    return FetchedBase(image, installed, dict(sources.delivered), sources.main)
