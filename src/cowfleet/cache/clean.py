"""One pass of the cache manager over ``_base``: what stays, what goes, and why.

Decide, then act:

1. :func:`cowfleet.cache.snapshot.gather` reads the node once (``_base``,
   every disk's backing chain, the in-use sources, pins, free space, the clock);
2. :func:`cowfleet.cache.plan.plan` decides from that snapshot alone (the
   rules are in its docstring and in docs/cache.md, "Cleaning");
3. :class:`cowfleet.cache.execute.Executor` carries the plan out, re-checking
   each step under its lock.

A dry run stops after step 2 and reports the plan: it takes no lock, creates no
file and changes no time stamp, so it is safe on a live Nova compute node's
directory.

"In use" comes from every instance disk's backing chain (symlinks followed),
every disk of every libvirt domain defined on the node, and every file a
running process holds open or mapped (:mod:`cowfleet.cache.holders`, injected as
``sources``); each decision says where its uses were found (``in_use_by``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cowfleet.cache.execute import Executor, InUseCheck, SourcesCheck, StopCheck
from cowfleet.cache.holders import HolderSource, node_sources
from cowfleet.cache.layout import Layout
from cowfleet.cache.plan import CleanPolicy, Plan, plan
from cowfleet.cache.report import KEEP, QUARANTINE, REMOVE, CleanReport, Decision
from cowfleet.cache.snapshot import Snapshot, gather
from cowfleet.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "KEEP",
    "QUARANTINE",
    "REMOVE",
    "CleanPolicy",
    "CleanReport",
    "Cleaner",
    "Decision",
    "StopCheck",
    "clean",
    "report",
]


class Cleaner:
    """One pass over one instances path. Every collaborator is injected."""

    def __init__(
        self,
        layout: Layout,
        policy: CleanPolicy,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
        sources: Sequence[HolderSource] = (),
        in_use: InUseCheck | None = None,
    ) -> None:
        self.layout = layout
        self.sources = tuple(sources)
        self.policy = policy
        self.clock = clock
        self.monotonic = monotonic
        self.statvfs = statvfs
        self.in_use = in_use  # None: ask the sources again

    def snapshot(self) -> Snapshot:
        """The node now (read-only)."""
        return gather(self.layout, sources=self.sources, clock=self.clock, statvfs=self.statvfs)

    def run(self, *, dry_run: bool = False, stop: StopCheck | None = None) -> CleanReport:
        """Snapshot, plan, then (unless ``dry_run``) carry the plan out."""
        started = self.monotonic()
        snap = self.snapshot()
        decided = plan(snap, self.policy)
        if dry_run:
            decisions = decided.decisions()
        else:
            in_use = self.in_use or SourcesCheck(self.sources, self.layout.base_dir)
            decisions = Executor(self.layout, in_use=in_use).run(decided, snap.at, stop=stop)
        result = report(
            snap, decided, decisions, dry_run=dry_run, seconds=self.monotonic() - started
        )
        _log(result)
        return result


def report(
    snap: Snapshot,
    decided: Plan,
    decisions: Sequence[Decision],
    *,
    dry_run: bool,
    seconds: float,
) -> CleanReport:
    """The report of a pass: the plan's arithmetic, and what became of each step."""
    return CleanReport(
        instances_path=snap.instances_path,
        dry_run=dry_run,
        at=snap.at,
        seconds=seconds,
        instances=snap.instances,
        disks=snap.disks,
        cache_bytes=decided.cache_bytes,
        freed_bytes=sum(d.allocated for d in decisions if d.action == REMOVE),
        in_use_bytes=decided.in_use_bytes,
        budget_bytes=decided.budget_bytes,
        over_budget_bytes=decided.over_budget_bytes,
        decisions=tuple(decisions),
        unreadable=snap.unreadable,
        broken=snap.broken,
        missing_bases=snap.missing_bases,
    )


def _log(report: CleanReport) -> None:
    level = logging.ERROR if report.count(QUARANTINE) else logging.INFO
    log.log(level, "cache pass on %s: %s", report.instances_path, report.summary())
    for p in report.unreadable:
        log.warning("cannot tell what %s uses: %s", p.path, p.reason)
    for p in report.broken:
        log.warning("broken backing chain: %s: %s", p.path, p.reason)


def clean(
    cfg: Config,
    *,
    dry_run: bool = False,
    min_age: float | None = None,
    clock: Callable[[], float] = time.time,
    stop: StopCheck | None = None,
) -> CleanReport:
    """One clean pass over ``cfg.instances_path`` with the configured limits."""
    cleaner = Cleaner(
        Layout(cfg.instances_path),
        CleanPolicy.from_config(cfg, min_age=min_age),
        clock=clock,
        sources=node_sources(cfg),
    )
    return cleaner.run(dry_run=dry_run, stop=stop)
