"""The node's cache manager: ``cowfleet node run`` runs one pass per interval.

A pass re-verifies the bases whose last verification is older than
``verify_interval`` (reading at most ``verify_rate`` bytes per second, so it
never starves the instances' I/O), then runs one clean pass
(:mod:`cowfleet.cache.clean`), which quarantines whatever failed. Passes are
logged one line each; a stop request (SIGTERM, SIGINT) ends the loop between
two bases and the process exits 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cowfleet.cache.clean import Cleaner, CleanPolicy, CleanReport
from cowfleet.cache.layout import Layout
from cowfleet.cache.verify import RateLimit, VerifyResult, verify_bases
from cowfleet.config import Config
from cowfleet.errors import CowfleetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassReport:
    number: int
    verified: tuple[VerifyResult, ...]
    clean: CleanReport
    seconds: float


class CacheManager:
    """Runs cache passes on one instances path. Clock, sleep and stop are injected."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.passes = 0

    def run_pass(self, *, stop: threading.Event | None = None) -> PassReport:
        started = self.monotonic()
        stopped = stop.is_set if stop is not None else None
        verified: list[VerifyResult] = []
        if self.cfg.verify_interval > 0:
            from cowfleet.cache.cache import ImageCache

            cache = ImageCache(self.cfg, clock=self.clock)  # no client: nothing is fetched
            pause = self._pause(stop)
            limit = RateLimit(self.cfg.verify_rate, monotonic=self.monotonic, sleep=pause)
            verified = verify_bases(
                cache,
                verified_before=self.clock() - self.cfg.verify_interval,
                limit=limit,
                stop=stopped,
            )
        cleaner = Cleaner(
            Layout(self.cfg.instances_path),
            CleanPolicy.from_config(self.cfg),
            clock=self.clock,
            monotonic=self.monotonic,
        )
        report = cleaner.run(stop=stopped)
        self.passes += 1
        result = PassReport(self.passes, tuple(verified), report, self.monotonic() - started)
        failed = [v for v in verified if not v.ok]
        log.info(
            "pass %d: re-verified %d bases (%d failed); %s",
            result.number,
            len(verified),
            len(failed),
            report.summary(),
        )
        return result

    def _pause(self, stop: threading.Event | None) -> Callable[[float], None]:
        """Sleep that a stop request cuts short (re-verification paces itself with it)."""
        if stop is None:
            return self.sleep

        def pause(seconds: float) -> None:
            stop.wait(seconds)

        return pause

    def run(self, stop: threading.Event, *, max_passes: int | None = None) -> int:
        """Pass, wait ``node_interval``, repeat until ``stop`` is set. Returns the passes run."""
        log.info(
            "node run: cache manager on %s, a pass every %.0fs",
            self.cfg.instances_path,
            self.cfg.node_interval,
        )
        while not stop.is_set():
            try:
                self.run_pass(stop=stop)
            except CowfleetError as exc:
                log.error("pass %d failed: %s", self.passes + 1, exc)
                log.debug("details", exc_info=True)
                self.passes += 1
            if max_passes is not None and self.passes >= max_passes:
                break
            stop.wait(self.cfg.node_interval)
        log.info("node run: stopped after %d passes", self.passes)
        return self.passes
