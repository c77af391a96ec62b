"""The node's cache manager: ``cowfleet node run`` runs one pass per interval.

A pass re-verifies the bases whose last verification is older than
``verify_interval`` (reading at most ``verify_rate`` bytes per second, so it
never starves the instances' I/O), then runs one clean pass
(:mod:`cowfleet.cache.clean`), which quarantines whatever failed, then brings
back the quarantined bases that instance disks still need (the base of a
stopped instance is fetched again through the cache's own fetch path, verified
like any fetch, while the image exists in the image service; when it is gone
the quarantine record says so, and ``cache list`` and ``server show`` show it).

Passes are logged one line each. A pass that fails for any reason is logged
(one line at ERROR with the pass number and instances path, the traceback at
DEBUG) and the loop goes on; it ends only on a stop request (SIGTERM, SIGINT:
between two bases, exit 0) or a configuration error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cowfleet.cache import metadata as md
from cowfleet.cache.clean import QUARANTINE, Cleaner, CleanPolicy, CleanReport
from cowfleet.cache.holders import HolderSource, node_sources
from cowfleet.cache.layout import Layout, base_name, is_image_id
from cowfleet.cache.listing import QuarantineRecord, quarantine_records
from cowfleet.cache.verify import RateLimit, VerifyResult, verify_bases
from cowfleet.config import Config
from cowfleet.errors import ConfigError, CowfleetError, NotFoundError

if TYPE_CHECKING:
    from cowfleet.images.client import ImageClient
    from cowfleet.metrics import NodeMetrics

log = logging.getLogger(__name__)

# restore outcomes
RESTORED = "restored"
IMAGE_GONE = "image gone"
GONE_STATUSES = frozenset({"deleted", "killed", "pending_delete"})


@dataclass(frozen=True)
class Restore:
    """A quarantined base that instance disks still need, and what the pass did about it."""

    name: str
    image_id: str | None
    outcome: str  # restored | image gone | failed: <why> | skipped: <why>


@dataclass(frozen=True)
class PassReport:
    number: int
    verified: tuple[VerifyResult, ...]
    clean: CleanReport
    seconds: float
    restored: tuple[Restore, ...] = ()


class CacheManager:
    """Runs cache passes on one instances path. Clock, sleep, sources and client are injected."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        sources: Callable[[Config], Sequence[HolderSource]] = node_sources,
        client: Callable[[], ImageClient] | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.sources = sources
        self.make_client = client
        self.passes = 0

    def run_pass(self, *, stop: threading.Event | None = None) -> PassReport:
        started = self.monotonic()
        stopped = stop.is_set if stop is not None else None
        verified: list[VerifyResult] = []
        if self.cfg.verify_interval > 0:
            pause = self._pause(stop)
            limit = RateLimit(self.cfg.verify_rate, monotonic=self.monotonic, sleep=pause)
            verified = verify_bases(
                Layout(self.cfg.instances_path),
                lock_timeout=self.cfg.fetch_deadline,
                max_virtual_size=self.cfg.max_virtual_size,
                clock=self.clock,
                verified_before=self.clock() - self.cfg.verify_interval,
                limit=limit,
                stop=stopped,
            )
        cleaner = Cleaner(
            Layout(self.cfg.instances_path),
            CleanPolicy.from_config(self.cfg),
            clock=self.clock,
            monotonic=self.monotonic,
            sources=self.sources(self.cfg),
        )
        report = cleaner.run(stop=stopped)
        if self.metrics is not None:
            self.metrics.cleaned(report.decisions)
        restored = self._restore(report, stopped)
        self.passes += 1
        result = PassReport(
            self.passes, tuple(verified), report, self.monotonic() - started, restored
        )
        failed = [v for v in verified if not v.ok]
        back = sum(1 for r in restored if r.outcome == RESTORED)
        log.info(
            "pass %d: re-verified %d bases (%d failed); %s%s",
            result.number,
            len(verified),
            len(failed),
            report.summary(),
            f"; {back} quarantined bases fetched again" if back else "",
        )
        return result

    # -- quarantined bases still needed ----------------------------------------
    def _restore(self, report: CleanReport, stop: Callable[[], bool] | None) -> tuple[Restore, ...]:
        """Fetch again each quarantined base that some disk still names."""
        layout = Layout(self.cfg.instances_path)
        wanted = set(report.missing_bases)
        # quarantined by this very pass while in use: its disks need it back now
        wanted.update(
            d.name
            for d in report.decisions
            if d.action == QUARANTINE and d.done and (d.users or d.in_use_by)
        )
        if not wanted:
            return ()
        records = {n: r for n, r in quarantine_records(layout).items() if n in wanted}
        if not records:
            return ()
        out: list[Restore] = []
        client: ImageClient | None = None
        try:
            for name in sorted(records):
                if stop is not None and stop():
                    break
                if os.path.lexists(layout.base_dir / name):
                    continue  # a base is back (or something else is there): nothing to do
                if client is None:
                    client = self._client()
                out.append(self._restore_one(client, name, records[name]))
        except CowfleetError as exc:  # no client (bad token file...): next pass tries again
            log.warning("cannot fetch quarantined bases again: %s", exc)
        finally:
            if client is not None:
                client.close()
        return tuple(out)

    def _client(self) -> ImageClient:
        if self.make_client is not None:
            return self.make_client()
        from cowfleet.images.client import ImageClient

        return ImageClient.from_config(self.cfg)

    def _restore_one(
        self, client: ImageClient, name: str, records: list[QuarantineRecord]
    ) -> Restore:
        from cowfleet.cache.cache import ImageCache

        image_id = records[-1].image_id
        if image_id is None or not is_image_id(image_id) or base_name(image_id) != name:
            return Restore(name, image_id, "skipped: the quarantine record names no image")
        try:
            image = client.get(image_id)
            if image.status in GONE_STATUSES:
                raise NotFoundError(f"image {image_id} is {image.status}", image_id=image_id)
            changed = _changed(image.os_hash_algo, image.os_hash_value, image.checksum, records)
            if changed:
                log.error("quarantined base %s not fetched again: %s", name, changed)
                return Restore(name, image_id, f"failed: {changed}")
            ImageCache(self.cfg, client, clock=self.clock, sleep=self.sleep).ensure_cached(image_id)
        except NotFoundError as exc:
            if not any(r.image_gone for r in records):
                log.error(
                    "quarantined base %s (image %s) is still needed by instance disks, but "
                    "the image is gone from the image service: %s",
                    name,
                    image_id,
                    exc,
                )
            self._mark(records, image_gone_at=self.clock())
            return Restore(name, image_id, IMAGE_GONE)
        except CowfleetError as exc:
            log.warning("quarantined base %s (image %s): fetch failed: %s", name, image_id, exc)
            return Restore(name, image_id, f"failed: {exc}")
        self._mark(records, image_gone_at=None, restored_at=self.clock())
        log.warning(
            "quarantined base %s (image %s) fetched again and verified: its instances can boot",
            name,
            image_id,
        )
        return Restore(name, image_id, RESTORED)

    @staticmethod
    def _mark(records: list[QuarantineRecord], **fields: float | None) -> None:
        import json

        for r in records:
            data = dict(r.data, **fields)
            try:
                md.write_atomic(r.record, json.dumps(data, indent=1))
            except CowfleetError as exc:
                log.warning("cannot update %s: %s", r.record, exc)

    # -- the loop ----------------------------------------------------------------
    def _pause(self, stop: threading.Event | None) -> Callable[[float], None]:
        """Sleep that a stop request cuts short (re-verification paces itself with it)."""
        if stop is None:
            return self.sleep

        def pause(seconds: float) -> None:
            stop.wait(seconds)

        return pause

    def run(self, stop: threading.Event, *, max_passes: int | None = None) -> int:
        """Pass, wait ``node_interval``, repeat until ``stop`` is set. Returns the passes run.

        A failing pass is logged and the loop goes on; only a configuration
        error (which the next pass would meet again) ends it early.
        """
        log.info(
            "node run: cache manager on %s, a pass every %.0fs",
            self.cfg.instances_path,
            self.cfg.node_interval,
        )
        while not stop.is_set():
            try:
                self.run_pass(stop=stop)
            except ConfigError:
                raise
            except Exception as exc:  # a daemon outlives what one pass meets
                log.error(
                    "pass %d on %s failed: %s: %s",
                    self.passes + 1,
                    self.cfg.instances_path,
                    type(exc).__name__,
                    exc,
                )
                log.debug("pass %d: traceback", self.passes + 1, exc_info=True)
                self.passes += 1
            if max_passes is not None and self.passes >= max_passes:
                break
            stop.wait(self.cfg.node_interval)
        log.info("node run: stopped after %d passes", self.passes)
        return self.passes


def _changed(
    algo: str | None, value: str | None, checksum: str | None, records: list[QuarantineRecord]
) -> str | None:
    """Why the image's data is not the data the quarantined base held, or None."""
    meta = records[-1].data.get("metadata")
    if not isinstance(meta, dict):
        return None  # nothing recorded to compare: the fetch's own checks stand
    was_algo, was_value = meta.get("hash_algo"), meta.get("hash_value")
    now_algo, now_value = (algo, value) if algo and value else ("md5", checksum)
    if not (isinstance(was_algo, str) and isinstance(was_value, str) and now_value):
        return None
    if was_algo.lower() != (now_algo or "").lower():
        return None  # another algorithm: not comparable here, the fetch verifies its own
    if was_value.lower() != now_value.lower():
        return f"the image's data changed ({now_algo} {now_value[:16]}..., was {was_value[:16]}...)"
    return None
