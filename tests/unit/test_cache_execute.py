"""The clean executor re-checks each step under its lock; a dry run is the plan, read-only.

Real bases (made by ImageCache with a fake image service) and injected in-use
sources whose answer changes between the snapshot and the execution.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from cowfleet.cache import clean as clean_mod
from cowfleet.cache import pins
from cowfleet.cache.clean import KEEP, QUARANTINE, REMOVE, Cleaner, CleanPolicy, CleanReport
from cowfleet.cache.execute import Executor, SourcesCheck
from cowfleet.cache.plan import Plan, plan
from cowfleet.cache.snapshot import Snapshot, gather
from cowfleet.cache.usage import HeldFile, Holders, Problem
from cowfleet.cli.main import main
from tests.unit.test_cache_clean import MAX_AGE, PART_AGE, Clock, FakeStatvfs, Node, _fail, _part

DAY = 86400.0


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, Clock(1_800_000_000.0))


class LateHolder:
    """A process that opens ``path`` after the snapshot: nothing on the first ask."""

    def __init__(self, path: Path, *, fail: bool = False) -> None:
        self.path = path
        self.fail = fail
        self.asked = 0

    def holders(self, base_dir: Path) -> Holders:
        self.asked += 1
        if self.asked == 1:
            return Holders()
        if self.fail:
            return Holders(problems=(Problem("proc", "/proc", "cannot list /proc"),))
        st = os.stat(self.path)
        return Holders(
            files=(HeldFile("process 4242 qemu-system-x86", ident=(st.st_dev, st.st_ino)),)
        )


def _by_name(report: CleanReport) -> dict[str, clean_mod.Decision]:
    return {d.name: d for d in report.decisions}


def _cleaner(node: Node, *sources: object) -> Cleaner:
    c = node.cleaner()
    c.sources = tuple(sources)  # type: ignore[arg-type]
    return c


def test_a_base_opened_after_the_snapshot_is_kept(node: Node) -> None:
    iid = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    other = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    late = LateHolder(node.path(iid))
    report = _cleaner(node, late).run()
    d = _by_name(report)
    assert d[node.name(iid)].action == KEEP and not d[node.name(iid)].done
    assert d[node.name(iid)].reason == "in use since the pass began (process 4242 qemu-system-x86)"
    assert node.path(iid).exists()
    # the other base is not held: removed, after its own re-check
    assert d[node.name(other)].action == REMOVE and d[node.name(other)].done
    assert not node.path(other).exists()
    assert late.asked == 3  # the snapshot, then one re-check per removal
    assert report.freed_bytes == d[node.name(other)].allocated


def test_an_in_use_check_that_cannot_be_made_keeps_the_base(node: Node) -> None:
    iid = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    d = _by_name(_cleaner(node, LateHolder(node.path(iid), fail=True)).run())[node.name(iid)]
    assert d.action == KEEP and "in-use check could not be made" in d.reason
    assert node.path(iid).exists()


def test_a_base_fetched_again_during_the_pass_is_kept(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    iid = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    path = node.path(iid)
    real = clean_mod.plan

    def plan_then_refetch(snap: Snapshot, policy: CleanPolicy) -> Plan:
        out = real(snap, policy)
        fresh = path.with_name(path.name + ".new")
        fresh.write_bytes(path.read_bytes())
        os.replace(fresh, path)  # another file under the same name now
        return out

    monkeypatch.setattr(clean_mod, "plan", plan_then_refetch)
    d = _by_name(node.cleaner().run())[node.name(iid)]
    assert d.action == KEEP and "replaced during this pass" in d.reason
    assert path.exists()


def test_a_part_restarted_during_the_pass_is_kept(node: Node) -> None:
    _name, part = _part(node, 10 * PART_AGE)
    snap = gather(node.layout, clock=node.clock, statvfs=FakeStatvfs(1, 1))
    p = plan(snap, CleanPolicy(MAX_AGE, PART_AGE))
    fresh = part.with_name(part.name + ".new")
    fresh.write_bytes(b"new download")
    os.replace(fresh, part)  # another file under the same name
    [d] = [d for d in Executor(node.layout).run(p, snap.at) if d.name == part.name]
    assert d.action == KEEP and "new download started" in d.reason and part.exists()


def test_the_executor_runs_the_plan_it_is_given(node: Node) -> None:
    """No second opinion: a step the plan keeps is kept, even if the node changed."""
    old = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    failed = node.base()
    _fail(node, failed)
    snap = gather(node.layout, clock=node.clock, statvfs=FakeStatvfs(1, 1))
    p = plan(snap, CleanPolicy(1e12, PART_AGE))  # nothing is old enough
    got = {d.name: d for d in Executor(node.layout).run(p, snap.at)}
    assert got[node.name(old)].action == KEEP and node.path(old).exists()
    assert got[node.name(failed)].action == QUARANTINE and got[node.name(failed)].done
    assert not node.path(failed).exists()


def test_sources_check_with_no_sources_asks_nothing(node: Node) -> None:
    iid = node.base()
    assert SourcesCheck((), node.layout.base_dir)(node.path(iid)) is None


# -- dry run: the plan, read-only ------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, ...]]:
    """Every entry under ``root`` with its full stat, but the access time (reading sets it)."""
    out: dict[str, tuple[int, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (
                st.st_mode,
                st.st_ino,
                st.st_dev,
                st.st_nlink,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_blocks,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
    return out


def _busy_node(node: Node) -> None:
    """One of everything a pass acts on: old, used, failed, pinned-once bases, parts, temp files."""
    now = node.clock.t = time.time()
    old = node.base(last_used=now - 10 * DAY)
    node.base(last_used=now - 2 * 3600)  # young: kept
    used = node.base(last_used=now - 10 * DAY)
    node.instance(used)
    node.used_at(used, now - 10 * DAY)
    failed = node.base(last_used=now - 10 * DAY)
    _fail(node, failed)
    _part(node, 10 * DAY)
    tmp_meta = node.layout.meta_dir / ".deadbeef.json.1.abcd.tmp"
    tmp_meta.write_text("{")
    os.utime(tmp_meta, (now - 10 * DAY, now - 10 * DAY))
    with pins.hold(node.layout.locks_dir, [node.name(old)]):
        pass
    assert stat.S_ISDIR(os.lstat(node.layout.locks_dir).st_mode)


def test_cli_dry_run_touches_nothing_and_prints_exactly_the_plan(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    _busy_node(node)
    common = ["--home", str(node.tmp), "--instances-path", str(node.cfg.instances_path)]
    before = _tree(node.tmp)

    assert main(["cache", "clean", "--dry-run", "--min-age", str(DAY), "-o", "json", *common]) == 0
    printed = json.loads(capsys.readouterr().out)
    # --long: every reason whole, each row ending with its file name
    assert main(["cache", "clean", "--dry-run", "--long", "--min-age", str(DAY), *common]) == 0
    table = capsys.readouterr().out

    assert _tree(node.tmp) == before  # no lock file, no time stamp, nothing moved
    policy = CleanPolicy.from_config(node.cfg, min_age=DAY)
    expected = plan(gather(node.layout, clock=time.time), policy)
    assert [
        (d["name"], d["action"], d["done"], d["reason"], d["allocated"])
        for d in printed["decisions"]
    ] == [(d.name, d.action, d.done, d.reason, d.allocated) for d in expected.decisions()]
    assert printed["dry_run"] is True
    assert printed["freed_bytes"] == expected.freed_bytes > 0
    assert {s.action for s in expected.steps} >= {
        KEEP,
        REMOVE,
        "remove-part",
        "remove-temp",
        QUARANTINE,
    }
    rows = table.splitlines()
    for s in expected.steps:
        [row] = [r for r in rows if r.rstrip().endswith(s.entry.name)]
        assert s.reason in row
        what = {KEEP: "kept", QUARANTINE: "would be quarantined"}.get(s.action, "would be removed")
        assert what in row
    assert _tree(node.tmp) == before

    # the same pass for real carries that plan out
    assert main(["cache", "clean", "--min-age", str(DAY), "-o", "json", *common]) == 0
    done = json.loads(capsys.readouterr().out)
    assert [(d["name"], d["action"]) for d in done["decisions"]] == [
        (d["name"], d["action"]) for d in printed["decisions"]
    ]
    assert all(d["done"] for d in done["decisions"] if d["action"] != KEEP)
