"""cache.clean.Cleaner with a fake clock and statvfs, on real bases made by ImageCache."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cowfleet.cache import clean as clean_mod
from cowfleet.cache import metadata as md
from cowfleet.cache import pins
from cowfleet.cache import snapshot as snapshot_mod
from cowfleet.cache.cache import CachedBase, ImageCache
from cowfleet.cache.clean import KEEP, QUARANTINE, REMOVE, Cleaner, CleanPolicy, CleanReport
from cowfleet.cache.layout import Layout, base_name
from cowfleet.cache.listing import list_entries
from cowfleet.cache.lock import base_lock
from cowfleet.cache.plan import Plan
from cowfleet.cache.snapshot import Snapshot
from cowfleet.cache.usage import Holders, Usage
from cowfleet.config import Config
from cowfleet.formats.overlay import create_overlay
from tests.unit._cache_fakes import FakeClient, image_for

KiB = 1024
MAX_AGE = 3600.0
PART_AGE = 600.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeStatvfs:
    """A filesystem of ``blocks`` 4 KiB blocks with ``avail`` of them free."""

    def __init__(self, blocks: int, avail: int) -> None:
        self.blocks = blocks
        self.avail = avail
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> os.statvfs_result:
        self.calls.append(Path(path))
        return os.statvfs_result((4096, 4096, self.blocks, self.avail, self.avail, 0, 0, 0, 0, 255))


@dataclass
class Node:
    tmp: Path
    clock: Clock
    cfg: Config = field(init=False)
    client: FakeClient = field(init=False)
    cache: ImageCache = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = Config(home=self.tmp, instances_path=self.tmp / "inst")
        self.client = FakeClient()
        self.cache = ImageCache(self.cfg, self.client, clock=self.clock, sleep=lambda _s: None)

    @property
    def layout(self) -> Layout:
        return self.cache.layout

    def base(self, size: int = 64 * KiB, *, last_used: float | None = None, **kw: object) -> str:
        """A verified base of a new image (random bytes: no holes); returns the image id."""
        iid = str(uuid.uuid4())
        data = os.urandom(size)
        self.client.add(image_for(iid, data, **kw), data)  # type: ignore[arg-type]
        self.cache.ensure_cached(iid)
        self.used_at(iid, self.clock.t if last_used is None else last_used)
        return iid

    def cached(self, iid: str) -> CachedBase:
        return self.cache.ensure_cached(iid)

    def path(self, iid: str) -> Path:
        return self.layout.paths(iid).base

    def name(self, iid: str) -> str:
        return base_name(iid)

    def used_at(self, iid: str, t: float) -> None:
        md.touch(self.layout.paths(iid).meta, t)

    def last_used(self, iid: str) -> float | None:
        return md.last_used(self.layout.paths(iid).meta)

    def instance(self, *iids: str, folder: str | None = None) -> Path:
        """An instance folder whose disks are overlays on the bases of ``iids``."""
        folder_path = self.cfg.instances_path / (folder or str(uuid.uuid4()))
        folder_path.mkdir(parents=True)
        info = {}
        for i, iid in enumerate(iids):
            disk = folder_path / ("disk" if i == 0 else f"disk.eph{i}")
            b = self.cached(iid)
            create_overlay(
                disk,
                b.path,
                "raw",
                size=b.virtual_size,
                backing_virtual_size=b.virtual_size,
                durable=False,
            )
            info[str(disk)] = "qcow2"
        (folder_path / "disk.info").write_text(json.dumps(info))
        return folder_path

    def allocated(self) -> dict[str, int]:
        return {e.name: e.allocated for e in list_entries(self.layout)}

    def cleaner(self, statvfs: FakeStatvfs | None = None, **policy: float) -> Cleaner:
        kw: dict[str, float] = {"max_unused_age": MAX_AGE, "part_max_age": PART_AGE}
        kw.update(policy)
        return Cleaner(
            self.layout,
            CleanPolicy(**kw),  # type: ignore[arg-type]
            clock=self.clock,
            monotonic=lambda: 0.0,
            statvfs=statvfs or FakeStatvfs(1, 1),
        )


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, Clock(time.time()))


def _by_name(report: CleanReport) -> dict[str, clean_mod.Decision]:
    return {d.name: d for d in report.decisions}


def _snapshot(root: Path) -> dict[str, tuple[bool, int, int, bytes]]:
    """Every entry under ``root``: directory?, mtime_ns, size, and the head of files."""
    out: dict[str, tuple[bool, int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            head = b""
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    head = fh.read(4096)
            out[os.path.relpath(p, root)] = (n in dirnames, st.st_mtime_ns, st.st_size, head)
    return out


# -- age ---------------------------------------------------------------------


def test_age_rule_removes_old_unused_bases_and_keeps_young_ones(node: Node) -> None:
    now = node.clock.t
    old = node.base(last_used=now - MAX_AGE - 1)
    young = node.base(last_used=now - MAX_AGE / 2)
    report = node.cleaner().run()
    d = _by_name(report)
    assert d[node.name(old)].action == REMOVE and d[node.name(old)].done
    assert "unused for" in d[node.name(old)].reason
    assert d[node.name(young)].action == KEEP and not d[node.name(young)].done
    assert "removed after" in d[node.name(young)].reason
    assert not node.path(old).exists()
    assert not node.layout.paths(old).meta.exists()  # its record goes with it
    assert node.path(young).exists()
    assert report.freed_bytes == d[node.name(old)].allocated > 0


def test_in_use_base_is_kept_and_touched_only_in_a_real_pass(node: Node) -> None:
    long_ago = node.clock.t - 10 * MAX_AGE
    used = node.base(last_used=long_ago)
    folder = node.instance(used)
    node.used_at(used, long_ago)  # instance() looked it up through the cache
    node.clock.t += 5.0

    dry = node.cleaner().run(dry_run=True)
    d = _by_name(dry)[node.name(used)]
    assert d.action == KEEP and d.users == (folder.name,)
    assert "in use by 1" in d.reason
    assert node.last_used(used) == pytest.approx(long_ago)

    real = node.cleaner().run()
    d = _by_name(real)[node.name(used)]
    assert d.action == KEEP and node.path(used).exists()
    assert node.last_used(used) == pytest.approx(node.clock.t)
    assert real.in_use_bytes == d.allocated


def test_base_used_by_a_provisioning_in_progress_folder_is_kept(node: Node) -> None:
    used = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    node.instance(used, folder=f".{uuid.uuid4()}.tmp")
    node.used_at(used, node.clock.t - 10 * MAX_AGE)
    d = _by_name(node.cleaner().run())[node.name(used)]
    assert d.action == KEEP and node.path(used).exists()


def test_pinned_base_is_kept_until_the_pin_is_released(node: Node) -> None:
    iid = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    with pins.hold(node.layout.locks_dir, [node.name(iid)]):
        d = _by_name(node.cleaner().run())[node.name(iid)]
        assert d.action == KEEP and "pinned" in d.reason
        assert node.path(iid).exists()
        # nor evicted for the budget
        d = _by_name(node.cleaner(max_cache_bytes=1).run())[node.name(iid)]
        assert d.action == KEEP and node.path(iid).exists()
    d = _by_name(node.cleaner().run())[node.name(iid)]
    assert d.action == REMOVE and d.done and not node.path(iid).exists()


# -- byte budget and free space -------------------------------------------------


def _lru_setup(node: Node) -> tuple[list[str], str]:
    now = node.clock.t
    # three unused, young bases (oldest use first) and one in use, all of different sizes
    lru = [node.base(s * KiB, last_used=now - a) for s, a in ((64, 300), (128, 200), (192, 100))]
    used = node.base(256 * KiB, last_used=now)
    node.instance(used)
    return lru, used


def test_budget_evicts_least_recently_used_first_until_under(node: Node) -> None:
    (a, b, c), used = _lru_setup(node)
    alloc = node.allocated()
    total = sum(alloc.values())
    budget = total - alloc[node.name(a)] - 1  # freeing A alone is not enough
    report = node.cleaner(max_cache_bytes=budget).run()
    d = _by_name(report)
    assert [d[node.name(i)].action for i in (a, b, c, used)] == [REMOVE, REMOVE, KEEP, KEEP]
    assert "least recently used" in d[node.name(a)].reason
    assert not node.path(a).exists() and not node.path(b).exists()
    assert node.path(c).exists() and node.path(used).exists()
    assert report.budget_bytes == budget and report.over_budget_bytes == 0
    assert report.cache_bytes - report.freed_bytes <= budget


def test_budget_never_evicts_in_use_and_reports_how_far_over_they_are(node: Node) -> None:
    (a, b, c), used = _lru_setup(node)
    in_use = node.allocated()[node.name(used)]
    budget = in_use // 2
    report = node.cleaner(max_cache_bytes=budget).run()
    d = _by_name(report)
    assert [d[node.name(i)].action for i in (a, b, c)] == [REMOVE] * 3
    assert d[node.name(used)].action == KEEP and node.path(used).exists()
    assert report.in_use_bytes == in_use
    assert report.over_budget_bytes == in_use - budget
    assert "exceed the budget" in report.summary()


def test_no_budget_no_eviction_of_young_bases(node: Node) -> None:
    (a, b, c), _used = _lru_setup(node)
    report = node.cleaner().run()
    assert report.count(REMOVE) == 0 and report.budget_bytes is None
    assert all(node.path(i).exists() for i in (a, b, c))


def test_min_free_percent_from_statvfs_triggers_lru_eviction(node: Node) -> None:
    (a, b, c), used = _lru_setup(node)
    alloc = node.allocated()
    blocks = 10_000  # 40 MB filesystem; 10 % must be free
    want_free = blocks * 4096 // 10
    avail = (want_free - alloc[node.name(a)] - 1) // 4096  # short by a little more than A
    fs = FakeStatvfs(blocks, avail)
    report = node.cleaner(fs, min_free_percent=10.0).run()
    d = _by_name(report)
    assert [d[node.name(i)].action for i in (a, b, c, used)] == [REMOVE, REMOVE, KEEP, KEEP]
    assert fs.calls == [node.layout.base_dir]
    short = want_free - avail * 4096
    assert report.budget_bytes == sum(alloc.values()) - short
    # plenty of room: nothing goes
    node2_report = node.cleaner(FakeStatvfs(blocks, blocks), min_free_percent=10.0).run()
    assert node2_report.count(REMOVE) == 0 and node.path(c).exists()


# -- downloads left behind --------------------------------------------------------


def _part(node: Node, age: float, suffix: str = ".part") -> tuple[str, Path]:
    iid = str(uuid.uuid4())
    paths = node.layout.paths(iid)
    node.layout.ensure_dirs()
    if suffix == ".part":
        md.write_atomic(
            paths.part_meta,
            md.PartMeta(iid, 1 << 20, "sha512", "0" * 128, "x", node.clock.t).to_json(),
            durable=False,
        )
    part = paths.base.with_name(paths.name + suffix)
    part.write_bytes(os.urandom(8 * KiB))
    t = node.clock.t - age
    os.utime(part, (t, t))
    return paths.name, part


@pytest.mark.parametrize("suffix", [".part", ".converted"])
def test_leftover_with_a_live_lock_holder_is_kept(node: Node, suffix: str) -> None:
    name, part = _part(node, 10 * PART_AGE, suffix)
    with base_lock(node.layout.locks_dir, name, timeout=1):
        d = _by_name(node.cleaner().run(dry_run=True))[part.name]
        assert d.action == KEEP and d.reason == "download in progress"
        d = _by_name(node.cleaner().run())[part.name]
        assert d.action == KEEP and d.reason == "download in progress"
        assert part.exists()
    d = _by_name(node.cleaner().run())[part.name]
    assert d.action == REMOVE and d.done and not part.exists()


def test_part_without_holder_is_removed_only_after_part_max_age(node: Node) -> None:
    name, part = _part(node, PART_AGE / 2)
    d = _by_name(node.cleaner().run())[part.name]
    assert d.action == KEEP and "to resume" in d.reason and part.exists()
    node.clock.t += PART_AGE / 2 + 1
    d = _by_name(node.cleaner().run())[part.name]
    assert d.action == REMOVE and d.done and not part.exists()
    assert not node.layout.paths_for_name(name).part_meta.exists()


def test_download_lock_held_by_another_process_keeps_the_part(node: Node) -> None:
    name, part = _part(node, 10 * PART_AGE)
    lock_file = node.layout.locks_dir / f"cowfleet-{name}"
    script = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(lock_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        d = _by_name(node.cleaner().run())[part.name]
        assert d.action == KEEP and d.reason == "download in progress" and part.exists()
    finally:
        proc.kill()
        proc.wait(10)
    assert _by_name(node.cleaner().run())[part.name].done and not part.exists()


# -- quarantine ------------------------------------------------------------------


def _fail(node: Node, iid: str, why: str = "sha512 differs") -> None:
    meta_path = node.layout.paths(iid).meta
    meta = md.read_meta(meta_path)
    assert meta is not None
    md.write_meta(meta_path, meta.marked(md.STATE_FAILED, why, node.clock.t))


def test_failed_base_is_quarantined_even_when_in_use(node: Node) -> None:
    iid = node.base()
    folder = node.instance(iid)
    data = node.path(iid).read_bytes()
    _fail(node, iid)
    node.clock.t = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    report = node.cleaner().run()
    d = _by_name(report)[node.name(iid)]
    assert d.action == QUARANTINE and d.done and d.users == (folder.name,)
    assert "sha512 differs" in d.reason
    qdir = node.layout.quarantine_dir
    moved = qdir / f"{node.name(iid)}.20231114T221320Z"
    assert sorted(os.listdir(qdir)) == [moved.name, moved.name + ".json"]
    assert moved.read_bytes() == data
    record = json.loads((qdir / (moved.name + ".json")).read_text())
    assert record["image_id"] == iid and record["users"] == [folder.name]
    assert record["reason"] == "sha512 differs" and record["moved_from"] == str(node.path(iid))
    assert record["metadata"]["state"] == md.STATE_FAILED
    assert not node.path(iid).exists()
    assert not node.layout.paths(iid).meta.exists()
    assert report.count(QUARANTINE) == 1 and "quarantined" in report.summary()


def test_base_whose_size_no_longer_matches_is_quarantined(node: Node) -> None:
    iid = node.base()
    os.chmod(node.path(iid), 0o644)
    with open(node.path(iid), "ab") as fh:
        fh.write(b"x")
    d = _by_name(node.cleaner().run())[node.name(iid)]
    assert d.action == QUARANTINE and d.done and not node.path(iid).exists()


# -- nothing removed when a disk cannot be read -------------------------------------


def test_an_unreadable_disk_stops_every_removal(node: Node) -> None:
    now = node.clock.t
    old = node.base(last_used=now - 10 * MAX_AGE)
    young = node.base(last_used=now - 10)
    _name, part = _part(node, 10 * PART_AGE)
    bad = node.cfg.instances_path / str(uuid.uuid4())
    bad.mkdir()
    (bad / "disk").write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(16))  # truncated header
    report = node.cleaner(max_cache_bytes=1).run()
    assert [p.path for p in report.unreadable] == [str(bad / "disk")]
    d = _by_name(report)
    for name in (node.name(old), node.name(young), part.name):
        assert d[name].action == KEEP and "could not be read" in d[name].reason, name
    assert node.path(old).exists() and node.path(young).exists() and part.exists()
    assert report.count(REMOVE) == 0 and report.freed_bytes == 0
    assert "nothing removed" in report.summary()


# -- kernel and ramdisk -------------------------------------------------------------


def _kernel_setup(node: Node, last_used: float) -> tuple[str, str, str]:
    kernel = node.base(16 * KiB, disk_format="aki", last_used=last_used)
    ramdisk = node.base(16 * KiB, disk_format="ari", last_used=last_used)
    image = node.base(
        64 * KiB,
        last_used=last_used,
        properties={"kernel_id": kernel, "ramdisk_id": ramdisk},
    )
    meta = md.read_meta(node.layout.paths(image).meta)
    assert meta is not None and (meta.kernel_id, meta.ramdisk_id) == (kernel, ramdisk)
    return image, kernel, ramdisk


def test_kernel_and_ramdisk_of_a_kept_image_base_stay(node: Node) -> None:
    long_ago = node.clock.t - 10 * MAX_AGE
    image, kernel, ramdisk = _kernel_setup(node, long_ago)
    folder = node.instance(image)  # the kernel/ramdisk are copied into folders, not backing
    for iid in (image, kernel, ramdisk):
        node.used_at(iid, long_ago)
    d = _by_name(node.cleaner().run())
    assert d[node.name(image)].action == KEEP
    for iid in (kernel, ramdisk):
        assert d[node.name(iid)].action == KEEP, d[node.name(iid)].reason
        assert "kernel/ramdisk of image" in d[node.name(iid)].reason
        assert node.path(iid).exists()
    # once the instance is gone and the image base ages out, all three go
    shutil.rmtree(folder)
    node.clock.t += 10 * MAX_AGE
    d = _by_name(node.cleaner().run())
    assert [d[node.name(i)].action for i in (image, kernel, ramdisk)] == [REMOVE] * 3
    assert not any(node.path(i).exists() for i in (image, kernel, ramdisk))


def test_kernel_and_ramdisk_of_a_pinned_image_are_not_evicted_for_the_budget(node: Node) -> None:
    image, kernel, ramdisk = _kernel_setup(node, node.clock.t - 10)
    with pins.hold(node.layout.locks_dir, [node.name(image)]):
        d = _by_name(node.cleaner(max_cache_bytes=1).run())
    assert [d[node.name(i)].action for i in (image, kernel, ramdisk)] == [KEEP] * 3
    assert all(node.path(i).exists() for i in (image, kernel, ramdisk))


def test_kernel_id_that_is_not_a_uuid_does_not_break_the_pass(node: Node) -> None:
    # image properties are free text in Glance: kernel_id may name nothing cacheable
    image = node.base(last_used=node.clock.t - 10 * MAX_AGE, properties={"kernel_id": "vmlinuz"})
    old = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    d = _by_name(node.cleaner().run())
    assert d[node.name(image)].action == REMOVE and d[node.name(old)].action == REMOVE


def test_unknown_files_with_odd_names_are_left_alone(node: Node) -> None:
    old = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    odd = ["image (1).qcow2", "backup~", "x" * 220, "ephemeral_1 copy"]
    for n in odd:
        (node.layout.base_dir / n).write_bytes(b"not ours")
    d = _by_name(node.cleaner().run())
    for n in odd:
        assert d[n].action == KEEP and not d[n].done, n
        assert (node.layout.base_dir / n).exists()
    assert d[node.name(old)].action == REMOVE and not node.path(old).exists()


# -- the pin token race ----------------------------------------------------------------


@contextlib.contextmanager
def _provisioning_during_scan(
    node: Node, monkeypatch: pytest.MonkeyPatch, iid: str, *, still_pinned: bool
) -> Iterator[list[Path]]:
    """Run a provisioning of ``iid`` right after the pass scanned the disks.

    Its folder is made after the scan, so the scan cannot have seen it: only the pin
    (still held) or its release token (changed) can keep the base.
    """
    made: list[Path] = []
    with contextlib.ExitStack() as held:
        real_scan = snapshot_mod.scan

        def scan_then_provision(instances_path: Path, holders: Holders | None = None) -> Usage:
            usage = real_scan(instances_path, holders)
            held.enter_context(pins.hold(node.layout.locks_dir, [node.name(iid)]))
            made.append(node.instance(iid))
            if not still_pinned:
                held.close()
            return usage

        monkeypatch.setattr(snapshot_mod, "scan", scan_then_provision)
        yield made


# A provisioning's ensure_cached refreshes the base's last use, so only a pass that
# evicts young bases too (over the budget, or --min-age 0) could race with it.
RACY = [{"max_cache_bytes": 1}, {"max_unused_age": 0.0}]


@pytest.mark.parametrize("policy", RACY, ids=["budget", "min-age-0"])
@pytest.mark.parametrize("still_pinned", [False, True], ids=["released", "held"])
def test_provisioning_during_the_scan_keeps_its_base(
    node: Node, monkeypatch: pytest.MonkeyPatch, still_pinned: bool, policy: dict[str, float]
) -> None:
    iid = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    with pins.hold(node.layout.locks_dir, [node.name(iid)]):
        pass  # an earlier provisioning: the pin file already has a token
    with _provisioning_during_scan(node, monkeypatch, iid, still_pinned=still_pinned) as made:
        report = node.cleaner(**policy).run()
    d = _by_name(report)[node.name(iid)]
    assert d.users == ()  # the scan did not see the new folder ...
    assert d.action == KEEP and not d.done  # ... but the base stays
    if still_pinned:
        assert "pinned by a provisioning" in d.reason
    else:
        assert "finished during this pass" in d.reason
    assert node.path(iid).exists() and len(made) == 1
    monkeypatch.undo()
    d = _by_name(node.cleaner(**policy).run())[node.name(iid)]
    assert d.action == KEEP and d.users == (made[0].name,)


@pytest.mark.parametrize("policy", RACY, ids=["budget", "min-age-0"])
def test_first_ever_pin_released_during_the_scan_keeps_the_base(
    node: Node, monkeypatch: pytest.MonkeyPatch, policy: dict[str, float]
) -> None:
    iid = node.base()
    assert pins.token(node.layout.locks_dir, node.name(iid)) == b""  # no pin file yet
    with _provisioning_during_scan(node, monkeypatch, iid, still_pinned=False):
        d = _by_name(node.cleaner(**policy).run())[node.name(iid)]
    assert d.action == KEEP and "finished during this pass" in d.reason
    assert node.path(iid).exists()


def test_pin_taken_after_the_decision_blocks_the_removal(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    iid = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    real = clean_mod.plan
    with contextlib.ExitStack() as held:

        def decide_then_pin(snap: Snapshot, policy: CleanPolicy) -> Plan:
            out = real(snap, policy)  # every decision is made: now a boot pins it
            held.enter_context(pins.hold(node.layout.locks_dir, [node.name(iid)]))
            return out

        monkeypatch.setattr(clean_mod, "plan", decide_then_pin)
        d = _by_name(node.cleaner().run())[node.name(iid)]
    assert d.action == KEEP and "started during this pass" in d.reason
    assert node.path(iid).exists()


def test_fetch_or_verify_holding_the_base_lock_blocks_the_removal(node: Node) -> None:
    iid = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    with base_lock(node.layout.locks_dir, node.name(iid), timeout=1):
        d = _by_name(node.cleaner().run())[node.name(iid)]
    assert d.action == KEEP and "busy" in d.reason and node.path(iid).exists()


# -- dry run ----------------------------------------------------------------------------


def test_dry_run_changes_nothing_and_creates_no_lock_files(node: Node) -> None:
    now = node.clock.t
    old = node.base(last_used=now - 10 * MAX_AGE)
    (_a, _b, _c), used = _lru_setup(node)
    node.used_at(used, now - 10 * MAX_AGE)
    failed = node.base()
    node.instance(failed)
    _fail(node, failed)
    _part(node, 10 * PART_AGE)
    tmp_meta = node.layout.meta_dir / ".deadbeef.json.1.abcd.tmp"
    tmp_meta.write_text("{")
    os.utime(tmp_meta, (now - 10 * PART_AGE, now - 10 * PART_AGE))
    with pins.hold(node.layout.locks_dir, [node.name(old)]):
        pass  # one pin file exists, with a token
    before = _snapshot(node.cfg.instances_path)
    locks_before = sorted(os.listdir(node.layout.locks_dir))

    report = node.cleaner(FakeStatvfs(10_000, 1), max_cache_bytes=1, min_free_percent=50).run(
        dry_run=True
    )

    assert _snapshot(node.cfg.instances_path) == before
    assert sorted(os.listdir(node.layout.locks_dir)) == locks_before
    assert report.dry_run and not any(d.done for d in report.decisions)
    d = _by_name(report)
    assert d[node.name(old)].action == REMOVE
    assert d[node.name(failed)].action == QUARANTINE
    assert d[f".cowfleet/{tmp_meta.name}"].action == REMOVE
    assert report.count(REMOVE) >= 5 and report.freed_bytes > 0
    assert "would remove" in report.summary()
    # the same pass for real does it
    real = node.cleaner(FakeStatvfs(10_000, 1), max_cache_bytes=1, min_free_percent=50).run()
    assert not node.path(old).exists() and not node.path(failed).exists()
    assert not tmp_meta.exists() and node.path(used).exists()
    assert real.count(REMOVE) == report.count(REMOVE)


def test_stop_request_leaves_everything_for_the_next_pass(node: Node) -> None:
    old = node.base(last_used=node.clock.t - 10 * MAX_AGE)
    report = node.cleaner().run(stop=lambda: True)
    d = _by_name(report)[node.name(old)]
    assert d.action == KEEP and "stopping" in d.reason and node.path(old).exists()
