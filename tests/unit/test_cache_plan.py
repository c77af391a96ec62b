"""plan(snapshot, policy): the clean pass's pure decision, property-tested over made-up nodes."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cowfleet.cache import metadata as md
from cowfleet.cache.clean import report
from cowfleet.cache.layout import base_name
from cowfleet.cache.listing import PIN, BaseEntry
from cowfleet.cache.plan import (
    ACTIONS,
    REMOVALS,
    REMOVE_PART,
    REMOVE_TEMP,
    CleanPolicy,
    Plan,
    Step,
    plan,
)
from cowfleet.cache.report import KEEP, QUARANTINE, REMOVE
from cowfleet.cache.snapshot import FileFacts, FsSpace, Snapshot
from cowfleet.cache.usage import Problem

NOW = 1_800_000_000.0
DAY = 86400.0
BASE_KINDS = ("base", "ephemeral", "swap")
HOLDERS = ("disk /i/a/disk", "libvirt domain web1", "process 812 qemu", PIN)


def _iid(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


@st.composite
def entries(draw: st.DrawFn, i: int, n: int) -> FileFacts:
    """File ``i`` of ``n``: any kind, any state, any use, any age."""
    kind = draw(
        st.sampled_from(
            (*BASE_KINDS, "base", "base", "part", "converted", "unknown", "quarantined", "temp")
        )
    )
    iid = _iid(i)
    name = {
        "base": base_name(iid),
        "ephemeral": f"ephemeral_{i}_40d1d2c",
        "swap": f"swap_{i}",
        "part": base_name(iid) + ".part",
        "converted": base_name(iid) + ".converted",
        "unknown": f"stray-{i}.bin",
        "quarantined": f".cowfleet/quarantine/{base_name(iid)}.20260101T000000Z",
        "temp": f".cowfleet/.{base_name(iid)}.json.1.ab.tmp",
    }[kind]
    state = draw(st.sampled_from((md.STATE_VERIFIED, md.STATE_FAILED, "unverified", "foreign")))
    if kind in ("ephemeral", "swap"):
        state = "unverified"
    elif kind != "base":
        state = "stray" if kind in ("unknown", "temp") else "resumable"
    in_use_by = draw(
        st.sampled_from(((), (), (PIN,))) | st.sets(st.sampled_from(HOLDERS)).map(sorted).map(tuple)
    )
    users = ("a",) if "disk /i/a/disk" in in_use_by else ()
    dep = draw(st.none() | st.integers(0, n - 1))  # a kernel_id naming another file's image
    age = draw(st.none() | st.floats(0, 30 * DAY))
    entry = BaseEntry(
        name=name,
        path=Path("/i/_base") / name,
        kind=kind,
        image_id=iid if kind == "base" else None,
        image_name=None,
        format=None,
        disk_format=None,
        allocated=draw(st.integers(0, 10**10)),
        size=0,
        virtual_size=None,
        users=users,
        last_used=None if age is None else NOW - age,
        state=state,
        failure=None,
        kernel_id=_iid(dep) if kind == "base" and dep is not None else None,
        in_use_by=in_use_by,
    )
    return FileFacts(
        entry, (1, i), b"", draw(st.booleans()) if kind in ("part", "converted") else False
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    n = draw(st.integers(0, 12))
    files = tuple(draw(entries(i, n)) for i in range(n))
    fs = draw(st.none() | st.builds(FsSpace, st.integers(1, 10**12), st.integers(0, 10**12)))
    unreadable = draw(st.sampled_from(((), (Problem("x", "/i/x/disk", "cannot read header"),))))
    return Snapshot("/i", NOW, files, fs, unreadable=unreadable)


policies = st.builds(
    CleanPolicy,
    max_unused_age=st.floats(0, 20 * DAY),
    part_max_age=st.floats(0, 2 * DAY),
    max_cache_bytes=st.sampled_from((0, 0)) | st.integers(1, 10**11),
    min_free_percent=st.sampled_from((0.0,)) | st.floats(0, 100),
)


def _evictable(snap: Snapshot, p: Plan | None = None) -> set[str]:
    """Names the budget may evict: unused, unpinned, healthy bases no image base needs.

    Without a plan, every base some image names as its kernel counts as needed
    (a lower bound); with one, only those of image bases the plan keeps.
    """
    keeps = {s.entry.name for s in p.steps if s.action == KEEP} if p else None
    needed = {
        base_name(f.entry.kernel_id)
        for f in snap.files
        if f.entry.kernel_id and (keeps is None or f.entry.name in keeps)
    }
    return {
        f.entry.name
        for f in snap.files
        if f.entry.kind in BASE_KINDS
        and f.entry.state in (md.STATE_VERIFIED, "unverified", "foreign")
        and not f.entry.used
        and PIN not in f.entry.in_use_by
        and f.entry.name not in needed
    }


def _projected(p: Plan) -> int:
    return p.cache_bytes - p.freed_bytes


@settings(max_examples=200, deadline=None)
@given(snapshots(), policies)
def test_never_removes_what_is_used_pinned_or_downloading(
    snap: Snapshot, policy: CleanPolicy
) -> None:
    p = plan(snap, policy)
    for s in p.steps:
        e = s.entry
        assert s.action in ACTIONS and s.reason
        if s.removes:
            assert not s.file.download_held, s
            assert (s.action == REMOVE_PART) == (e.kind in ("part", "converted")), s
            assert (s.action == REMOVE_TEMP) == (e.kind == "temp"), s
        if s.action == REMOVE:  # a base (or an ephemeral/swap base)
            assert e.kind in BASE_KINDS, s
            assert not e.used and not e.users, s
            assert PIN not in e.in_use_by, s
        if s.action == QUARANTINE:
            assert e.state == md.STATE_FAILED and e.kind == "base", s
        if e.kind in ("unknown", "quarantined"):
            assert s.action == KEEP, s
        assert s.touch == (s.action == KEEP and e.used and e.kind in BASE_KINDS)
    # an image base that stays keeps its kernel
    by_name = {s.entry.name: s for s in p.steps}
    for s in p.steps:
        kernel = by_name.get(base_name(s.entry.kernel_id)) if s.entry.kernel_id else None
        if kernel is not None and s.action == KEEP and s.entry.kind == "base":
            assert kernel.action not in REMOVALS, (s, kernel)


@settings(max_examples=200, deadline=None)
@given(snapshots(), policies)
def test_unreadable_disks_hold_everything_but_temporary_files(
    snap: Snapshot, policy: CleanPolicy
) -> None:
    p = plan(snap, policy)
    if snap.unreadable:
        assert all(s.action in (KEEP, QUARANTINE, REMOVE_TEMP) for s in p.steps)


@settings(max_examples=300, deadline=None)
@given(snapshots(), policies)
def test_budget_and_free_space_floor_hold_whenever_enough_unused_bases_exist(
    snap: Snapshot, policy: CleanPolicy
) -> None:
    snap = replace(snap, unreadable=())
    p = plan(snap, policy)
    by_name = {f.entry.name: f.entry for f in snap.files}
    evictable = sum(
        by_name[n].allocated for n in _evictable(snap) if n in {s.entry.name for s in p.steps}
    )
    must_stay = sum(s.entry.allocated for s in p.steps) - evictable
    # what age rules remove anyway (parts, temp files) only helps
    aged_out = sum(s.entry.allocated for s in p.steps if s.action in (REMOVE_PART, REMOVE_TEMP))
    if policy.max_cache_bytes:
        assert p.budget_bytes is not None
        if must_stay - aged_out <= policy.max_cache_bytes:
            assert _projected(p) <= policy.max_cache_bytes
    floor = policy.min_free_percent > 0 and snap.fs is not None
    if floor:
        assert snap.fs is not None
        want = math.ceil(snap.fs.total * policy.min_free_percent / 100)
        if snap.fs.available + evictable + aged_out >= want:
            assert snap.fs.available + p.freed_bytes >= want
    if p.over_budget_bytes == 0:
        if policy.max_cache_bytes:
            assert _projected(p) <= policy.max_cache_bytes
        if floor:
            assert snap.fs is not None
            want = math.ceil(snap.fs.total * policy.min_free_percent / 100)
            assert snap.fs.available + p.freed_bytes >= want
    if not policy.max_cache_bytes and not floor:
        assert p.budget_bytes is None and p.over_budget_bytes == 0
        assert not any("over the budget" in s.reason for s in p.steps)


@settings(max_examples=200, deadline=None)
@given(snapshots(), policies)
def test_budget_evicts_least_recently_used_first(snap: Snapshot, policy: CleanPolicy) -> None:
    p = plan(snap, policy)
    evicted = [s for s in p.steps if "over the budget" in s.reason and s.action == REMOVE]
    spared = [s for s in p.steps if s.action == KEEP and "; removed after" in s.reason]
    for gone in evicted:
        assert gone.entry.name in _evictable(snap, p)
        for kept in spared:
            assert (gone.entry.last_used or 0.0) <= (kept.entry.last_used or 0.0)


@settings(max_examples=100, deadline=None)
@given(snapshots(), policies)
def test_plan_is_a_function_of_its_inputs(snap: Snapshot, policy: CleanPolicy) -> None:
    assert plan(snap, policy) == plan(snap, policy)
    # one line per file, in the snapshot's order (young temporary files are not worth one)
    names = [s.entry.name for s in plan(snap, policy).steps]
    assert names == [f.entry.name for f in snap.files if f.entry.name in names]
    assert len(set(names)) == len(names)
    assert all(f.entry.kind == "temp" for f in snap.files if f.entry.name not in names)


@settings(max_examples=200, deadline=None)
@given(snapshots(), policies)
def test_a_dry_run_reports_exactly_the_plan(snap: Snapshot, policy: CleanPolicy) -> None:
    p = plan(snap, policy)
    r = report(snap, p, p.decisions(), dry_run=True, seconds=0.0)
    assert [(d.name, d.action, d.reason, d.done) for d in r.decisions] == [
        (s.entry.name, REMOVE if s.action in REMOVALS else s.action, s.reason, False)
        for s in p.steps
    ]
    assert r.freed_bytes == p.freed_bytes
    assert (r.budget_bytes, r.over_budget_bytes) == (p.budget_bytes, p.over_budget_bytes)
    assert r.cache_bytes == p.cache_bytes


def test_step_decision_shows_every_removal_as_remove() -> None:
    entry = BaseEntry(
        "x.part",
        Path("/i/_base/x.part"),
        "part",
        None,
        None,
        None,
        None,
        1,
        1,
        None,
        (),
        NOW,
        "stray",
    )
    d = Step(FileFacts(entry), REMOVE_PART, "abandoned").decision()
    assert (d.action, d.done, d.reason) == (REMOVE, False, "abandoned")
