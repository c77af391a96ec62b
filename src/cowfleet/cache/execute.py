"""Carry out a clean :class:`~cowfleet.cache.plan.Plan`, checking each step again first.

The plan was made from a snapshot; by the time a step runs the node may have
moved on. So every removal re-checks, under the locks that keep the answer
true while the file goes, and without waiting for any of them:

- a base (or ephemeral/swap base): its pin file held exclusively (no
  provisioning pins it), the pin token unchanged since the snapshot (none
  finished during the pass), its base lock (no fetch or verification holds it),
  the same file as in the snapshot, and no in-use source (processes, libvirt
  domains) using it now;
- a ``.part``/``.converted`` file: its download lock, and the same file;
- a quarantine: the base lock, and the same file.

A step whose check fails is kept, with the reason; the next pass looks again.
Each step becomes one :class:`~cowfleet.cache.report.Decision` saying what was
done, or what was skipped and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from cowfleet.cache import metadata as md
from cowfleet.cache import pins
from cowfleet.cache.holders import HolderSource, collect
from cowfleet.cache.layout import SHA1_RE, Layout
from cowfleet.cache.lock import base_lock
from cowfleet.cache.plan import REMOVE_PART, REMOVE_TEMP, Plan, Step
from cowfleet.cache.report import KEEP, QUARANTINE, REMOVE, Decision
from cowfleet.cache.snapshot import ident_of
from cowfleet.cache.usage import scan_holders
from cowfleet.errors import CowfleetError, TimeoutError_

log = logging.getLogger(__name__)

StopCheck = Callable[[], bool]
# a file about to be removed -> why it must stay after all (None: nothing uses it now)
InUseCheck = Callable[[Path], "str | None"]


class SourcesCheck:
    """Asks the in-use sources (processes, libvirt domains) again about one file."""

    def __init__(self, sources: Sequence[HolderSource], base_dir: Path) -> None:
        self.sources = tuple(sources)
        self.base_dir = base_dir

    def __call__(self, path: Path) -> str | None:
        if not self.sources:
            return None
        holders = collect(self.sources, self.base_dir)
        if holders.problems:
            p = holders.problems[0]
            return f"the in-use check could not be made ({p.path}: {p.reason}): kept"
        found = scan_holders(holders).holders_of(path)
        if found:
            return f"in use since the pass began ({'; '.join(sorted(found))})"
        return None


class Executor:
    """Runs the steps of a plan on one instances path, in order."""

    def __init__(self, layout: Layout, *, in_use: InUseCheck | None = None) -> None:
        self.layout = layout
        self.in_use: InUseCheck = in_use or (lambda _path: None)

    def run(self, plan: Plan, now: float, *, stop: StopCheck | None = None) -> tuple[Decision, ...]:
        """Carry out every step; ``now`` (the snapshot's time) stamps last uses and quarantines."""
        return tuple(self._step(s, now, stop) for s in plan.steps)

    def _step(self, step: Step, now: float, stop: StopCheck | None) -> Decision:
        action = step.action
        if stop is not None and stop():
            if action == KEEP:
                return step.decision()
            return step.decision(
                action=KEEP, reason=f"{step.reason}; stopping: left for the next pass"
            )
        try:
            if action == KEEP:
                if step.touch:
                    self._touch(step, now)
                return step.decision()
            if action == QUARANTINE:
                why_not = self._quarantine(step, now)
                if why_not is not None:
                    return step.decision(
                        action=KEEP, reason=f"{step.reason}; not quarantined: {why_not}"
                    )
                return step.decision(done=True)
            why_not = self._remove(step)
        except (OSError, CowfleetError) as exc:
            log.warning("cannot %s %s: %s", action, step.entry.path, exc)
            return step.decision(action=KEEP, reason=f"{step.reason}; failed: {exc}")
        if why_not is not None:
            return step.decision(action=KEEP, reason=why_not)
        return step.decision(done=True)

    # -- keep ------------------------------------------------------------------------
    def _touch(self, step: Step, now: float) -> None:
        """Record that an in-use file was seen in use now (its age counts from here)."""
        e = step.entry
        if e.kind == "base" and e.image_id is not None:
            md.touch(self.layout.paths_for_name(e.name).meta, now)
        else:
            os.utime(e.path, (now, now), follow_symlinks=False)

    # -- remove ----------------------------------------------------------------------
    def _remove(self, step: Step) -> str | None:
        """Remove one file; the reason it was kept instead, or None when removed."""
        e = step.entry
        if step.action == REMOVE_TEMP:
            md.remove_quietly(e.path)
            return None
        if step.action == REMOVE_PART:
            stem = e.name.partition(".")[0]
            with self._try_lock(stem) as locked:
                if not locked:
                    return "download in progress"
                if self._replaced(step):
                    return "a new download started during this pass: looked at again next pass"
                md.remove_quietly(e.path)
                if e.kind == "part":
                    md.remove_quietly(self.layout.paths_for_name(stem).part_meta)
            return None
        assert step.action == REMOVE, step.action
        locks = self.layout.locks_dir
        with pins.exclusive(locks, e.name) as free:
            if not free:
                return "pinned by a provisioning that started during this pass"
            if pins.token(locks, e.name) != step.file.token:
                return "a provisioning finished during this pass: looked at again next pass"
            with self._try_lock(e.name) as locked:
                if not locked:
                    return "busy: a fetch or a verification holds it"
                if self._replaced(step):
                    return "replaced during this pass (fetched again): looked at again next pass"
                why_not = self.in_use(e.path)
                if why_not is not None:
                    return why_not
                md.remove_quietly(e.path)
                if e.kind == "base" and SHA1_RE.match(e.name):
                    paths = self.layout.paths_for_name(e.name)
                    md.remove_quietly(paths.meta)
                    md.remove_quietly(paths.failed)
        log.info("removed %s (%d bytes): unused", e.path, e.allocated)
        return None

    @staticmethod
    def _replaced(step: Step) -> bool:
        """Whether another file now has the name (a file gone meanwhile is not one)."""
        was = step.file.ident
        now = ident_of(step.entry.path)
        return was is not None and now is not None and now != was

    # -- quarantine ------------------------------------------------------------------
    def _quarantine(self, step: Step, now: float) -> str | None:
        e = step.entry
        paths = self.layout.paths_for_name(e.name)
        qdir = self.layout.quarantine_dir
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        with self._try_lock(e.name) as locked:
            if not locked:
                return "busy: a fetch or a verification holds it"
            if self._replaced(step):
                return "replaced during this pass (fetched again): looked at again next pass"
            qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            dest = qdir / f"{e.name}.{stamp}"
            meta = md.read_meta(paths.meta)
            record = {
                "name": e.name,
                "image_id": e.image_id,
                "image_name": e.image_name,
                "reason": e.failure or "failed verification",
                "quarantined_at": now,
                "users": list(e.users),
                "moved_from": str(e.path),
                "metadata": asdict(meta) if meta else None,
            }
            md.write_atomic(dest.with_name(dest.name + ".json"), json.dumps(record, indent=1))
            os.rename(e.path, dest)
            md.remove_quietly(paths.meta)
            md.remove_quietly(paths.failed)
        log.error(
            "QUARANTINED base %s (image %s, used by %d instances): %s; moved to %s; "
            "'cowfleet cache fetch %s' brings back a verified copy under the same name",
            e.path,
            e.image_id,
            len(e.users),
            e.failure,
            dest,
            e.image_id,
        )
        return None

    @contextlib.contextmanager
    def _try_lock(self, name: str) -> Iterator[bool]:
        """The base lock of ``name`` if free now (no waiting): yields whether it was."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(base_lock(self.layout.locks_dir, name, timeout=0))
            except TimeoutError_:
                yield False
                return
            yield True
