"""Benchmark: one cache-manager pass over 10,000 instance folders (target: <= 2 s).

Setup (not timed, its duration printed): in a work directory, an instances path
with ``_base`` holding 20 sparse raw image bases (each with cowfleet metadata),
an ``ephemeral_*`` and a ``swap_*`` base, and ``--folders`` instance folders
(default 10,000), each with a ``disk`` qcow2 overlay, most also with
``disk.local`` and ``disk.swap`` overlays (all written by
``cowfleet.formats.overlay.create_overlay``), a ``disk.info`` line pinning
them as qcow2 (absolute paths as keys, as Nova and cowfleet write it),
``instance.json`` and ``console.log``. Four image bases, a base without
metadata (Nova's) and a second ephemeral base are used by no disk: five of
them are 60 days old (the pass removes them), one is an hour old (it stays).

Timed, each ``--runs`` times (best and median):

* ``usage.scan`` alone (every disk header read, chains followed);
* ``Cleaner.run(dry_run=True)``: the whole pass, deciding only;
* ``Cleaner.run()``: the real pass; the old unused bases are planted again
  (untimed) before each run, so every run removes five files and touches the
  last use of every in-use base.

The first timed runs follow the setup, so the page cache is warm: the figures
are those of a node that cleans periodically. With ``--cold`` (default when
root), each is also run once after ``echo 3 > /proc/sys/vm/drop_caches``.

Baseline in the same run: ``qemu-img info -f qcow2 --output=json DISK`` (what
Nova's image cache manager runs per disk to learn its backing file), one
sequential subprocess for each of ``--qemu-disks`` (200) disks spread over the
folders: its cost per disk against the scan's, and its time extrapolated to
every disk of the folders. Peak RSS is that of a fresh interpreter doing one
pass (read from ``VmHWM``), next to the same interpreter after its imports.

    python3 bench/cache_clean.py [--folders 10000] [--runs 5] [--dir /var/tmp] [--no-cold] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cowfleet.cache import metadata as md
from cowfleet.cache.clean import REMOVE, Cleaner, CleanPolicy, CleanReport
from cowfleet.cache.layout import Layout
from cowfleet.cache.usage import Usage, scan
from cowfleet.formats.overlay import create_overlay
from overlay_create import uptime

MIB = 1024**2
GIB = 1024**3
DAY = 86400.0
TARGET_S = 2.0
IMAGES = 20  # image bases
UNUSED_IMAGES = 4  # of which no disk uses these
OLD_AGE = 60 * DAY
MAX_UNUSED_AGE = 30 * DAY
IMAGE_VSIZE = 2 * GIB
ROOT_SIZE = 20 * GIB
EPH = "ephemeral_1_0706d66"
EPH_OLD = "ephemeral_2_40d7"
SWAP = "swap_512"
FOREIGN_OLD = "0" * 40  # a sha1-named base without cowfleet metadata (Nova's)


def _sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as fh:
        fh.write(os.urandom(4096))
        fh.truncate(size)
    os.chmod(path, 0o444)


def _base_meta(image_id: str, size: int, at: float) -> md.BaseMeta:
    return md.BaseMeta(
        image_id=image_id,
        name=f"bench-{image_id[:8]}",
        disk_format="raw",
        file_format="raw",
        image_size=size,
        file_size=size,
        virtual_size=size,
        hash_algo="sha512",
        hash_value="0" * 128,
        file_hash_algo="sha512",
        file_hash_value="0" * 128,
        fetched_at=at,
        source="http://127.0.0.1:9292",
        verified_at=at,
    )


class Tree:
    """The instances path the benchmark scans, and what a pass must find in it."""

    def __init__(self, root: Path, folders: int, sample: int) -> None:
        self.layout = Layout(root)
        self.folders = folders
        self.sample_size = sample
        self.used: list[Path] = []  # image bases some disk uses
        self.unused_old: list[Path] = []  # removed by a pass
        self.unused_recent: list[Path] = []  # unused but kept (too young)
        self.eph = self.layout.base_dir / EPH
        self.swap = self.layout.base_dir / SWAP
        self.image_ids: dict[Path, str] = {}
        self.disks = 0
        self.sample: list[Path] = []  # disks given to qemu-img info

    def _image_base(self, image_id: str, last_used: float) -> Path:
        paths = self.layout.paths(image_id)
        _sparse(paths.base, IMAGE_VSIZE)
        md.write_atomic(
            paths.meta, _base_meta(image_id, IMAGE_VSIZE, last_used).to_json(), durable=False
        )
        os.utime(paths.meta, (last_used, last_used))
        self.image_ids[paths.base] = image_id
        return paths.base

    def plant_unused(self, now: float) -> None:
        """(Re)create the bases no disk uses; the old ones get removed by a real pass."""
        old = now - OLD_AGE
        self.unused_old = []
        for i in range(UNUSED_IMAGES - 1):
            self.unused_old.append(self._image_base(str(uuid.UUID(int=1000 + i)), old))
        for name in (FOREIGN_OLD, EPH_OLD):
            p = self.layout.base_dir / name
            _sparse(p, IMAGE_VSIZE if name == FOREIGN_OLD else GIB)
            os.utime(p, (old, old))
            self.unused_old.append(p)
        self.unused_recent = [self._image_base(str(uuid.UUID(int=2000)), now - 3600)]

    def build(self) -> None:
        now = time.time()
        self.layout.ensure_dirs()
        for i in range(IMAGES - UNUSED_IMAGES):
            self.used.append(self._image_base(str(uuid.UUID(int=1 + i)), now - 2 * DAY))
        _sparse(self.eph, GIB)
        _sparse(self.swap, 512 * MIB)
        for p in (self.eph, self.swap):
            os.utime(p, (now - 2 * DAY, now - 2 * DAY))
        self.plant_unused(now)
        every = max(1, self.folders // max(1, self.sample_size))
        for n in range(self.folders):
            folder = self.layout.instances_path / str(uuid.UUID(int=(1 << 100) + n))
            os.mkdir(folder)
            disks = [("disk", self.used[n % len(self.used)], IMAGE_VSIZE, ROOT_SIZE)]
            if n % 10:  # 90% of the flavors have ephemeral and swap disks
                disks += [
                    ("disk.local", self.eph, GIB, GIB),
                    ("disk.swap", self.swap, 512 * MIB, 512 * MIB),
                ]
            for file, base, vsize, size in disks:
                create_overlay(
                    folder / file,
                    base,
                    "raw",
                    size=size,
                    backing_virtual_size=vsize,
                    durable=False,
                )
            self.disks += len(disks)
            info = {str(folder / f): "qcow2" for f, *_ in disks}
            (folder / "disk.info").write_text(json.dumps(info) + "\n")
            (folder / "console.log").write_text("")
            record = {
                "uuid": folder.name,
                "name": f"vm-{n}",
                "image_id": self.image_ids[disks[0][1]],
            }
            (folder / "instance.json").write_text(json.dumps(record) + "\n")
            if n % every == 0:
                self.sample.append(folder / disks[(n // every) % len(disks)][0])

    # -- checks: a fast pass that finds the wrong answer is worth nothing -------------
    def check_usage(self, usage: Usage) -> None:
        assert usage.instances == self.folders, (usage.instances, self.folders)
        assert usage.disks == self.disks, (usage.disks, self.disks)
        assert not usage.unreadable and not usage.broken, (usage.unreadable, usage.broken)
        per_image = {b: len(usage.users_of(b)) for b in self.used}
        assert sum(per_image.values()) == self.folders, per_image
        with_eph = self.folders - len(range(0, self.folders, 10))
        assert len(usage.users_of(self.eph)) == with_eph
        assert len(usage.users_of(self.swap)) == with_eph
        for p in self.unused_old + self.unused_recent:
            assert not usage.users_of(p), p

    def check_report(self, report: CleanReport, dry_run: bool) -> None:
        assert report.instances == self.folders and report.disks == self.disks
        removed = sorted(d.name for d in report.decisions if d.action == REMOVE)
        assert removed == sorted(p.name for p in self.unused_old), removed
        assert all(d.done != dry_run for d in report.decisions if d.action == REMOVE)
        for p in self.unused_old:
            assert p.exists() == dry_run, p


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Series:
    """Wall-clock and CPU (user + sys) seconds of repeated runs of one measurement."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, fn: Callable[[], Any]) -> Any:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        return out

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def __str__(self) -> str:
        w = self.wall
        return (
            f"best {min(w):6.3f} s  median {self.median:6.3f} s  "
            f"(CPU median {statistics.median(self.cpu):.3f} s)   runs: "
            + " ".join(f"{x:.3f}" for x in w)
        )


def drop_caches() -> bool:
    """Empty the page cache, dentries and inodes (needs root); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


def qemu_info(qemu_img: str, disks: list[Path]) -> float:
    """Seconds for one sequential ``qemu-img info`` per disk; checks what each says."""
    t0 = time.perf_counter()
    for d in disks:
        out = subprocess.run(
            [qemu_img, "info", "-f", "qcow2", "--output=json", str(d)],
            check=True,
            capture_output=True,
        ).stdout
        assert json.loads(out)["backing-filename"].startswith("/")
    return time.perf_counter() - t0


_CHILD = """
import json, os, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from pathlib import Path
from cowfleet.cache.clean import CleanPolicy, Cleaner
from cowfleet.cache.layout import Layout
imported = hwm()
t0 = time.perf_counter()
r = Cleaner(Layout(Path(sys.argv[1])), CleanPolicy(float(sys.argv[2]), 86400.0)).run(dry_run=True)
seconds = time.perf_counter() - t0
print(json.dumps({"imported": imported, "peak": hwm(), "seconds": seconds, "disks": r.disks}))
"""


def child_pass(root: Path) -> dict[str, Any]:
    """One dry-run pass in a fresh interpreter: its peak RSS and time."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), str(MAX_UNUSED_AGE)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--folders", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each measurement")
    ap.add_argument("--qemu-disks", type=int, default=200, help="disks given to qemu-img info")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    cold = ap.add_mutually_exclusive_group()
    cold.add_argument("--cold", dest="cold", action="store_true", default=os.geteuid() == 0)
    cold.add_argument("--no-cold", dest="cold", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        print("qemu-img not installed: no baseline", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-clean-", dir=args.dir))
    load_before = uptime()
    try:
        tree = Tree(work / "instances", args.folders, args.qemu_disks)
        setup_s, _ = _timed(tree.build)
        policy = CleanPolicy(max_unused_age=MAX_UNUSED_AGE, part_max_age=DAY)
        cleaner = Cleaner(tree.layout, policy)
        print(
            f"cache pass over {tree.folders} instance folders, {tree.disks} qcow2 disks, "
            f"_base: {IMAGES} image bases ({UNUSED_IMAGES} unused), ephemeral, swap, and an "
            f"unused Nova base and ephemeral base; in {work}"
        )
        print(
            f"  setup (not timed): {setup_s:.1f} s ({setup_s / tree.disks * 1e3:.3f} ms per "
            "overlay, with folder, disk.info, instance.json, console.log)"
        )
        sample = tree.sample[: args.qemu_disks]
        qemu_info(qemu_img, sample[:3])  # warm the binary and its libraries
        scans, dry, real = Series(), Series(), Series()
        q_total = 0.0
        # Interleaved, so every series (and the baseline) sees the same machine load.
        for run in range(args.runs):
            tree.check_usage(scans.run(lambda: scan(tree.layout.instances_path)))
            tree.check_report(dry.run(lambda: cleaner.run(dry_run=True)), dry_run=True)
            report = real.run(lambda: cleaner.run(dry_run=False))
            tree.check_report(report, dry_run=False)
            touched = md.last_used(tree.layout.paths(tree.image_ids[tree.used[0]]).meta) or 0.0
            assert touched >= report.at - 1, "in-use base not touched"
            tree.plant_unused(time.time())  # untimed: the next real pass removes them again
            q_total += qemu_info(qemu_img, sample[run :: args.runs])
        n_disks = tree.disks
        m_scan, m_real = scans.median, real.median
        print(
            f"  {args.runs} runs of each, interleaved; the first follows the setup, so the page "
            "cache is warm (as on a node that cleans periodically)"
        )
        print(f"  (a) usage.scan             {scans}")
        print(f"  (b) Cleaner pass, dry run  {dry}")
        print(f"  (c) Cleaner pass, real     {real}")
        print(
            f"      scan: {m_scan / n_disks * 1e6:.1f} us per disk, "
            f"{m_scan / tree.folders * 1e6:.0f} us per folder (median); real pass: 5 removals, "
            "last use of every in-use base touched"
        )
        print(f"      last report: {report.summary()}")
        cold_scan = cold_dry = cold_real = None
        if args.cold:
            if drop_caches():
                cold_scan, usage = _timed(lambda: scan(tree.layout.instances_path))
                tree.check_usage(usage)
                drop_caches()
                cold_dry, report = _timed(lambda: cleaner.run(dry_run=True))
                tree.check_report(report, dry_run=True)
                drop_caches()
                cold_real, report = _timed(lambda: cleaner.run(dry_run=False))
                tree.check_report(report, dry_run=False)
                tree.plant_unused(time.time())
                print(
                    f"  cold page cache (after drop_caches, once each): scan {cold_scan:.3f} s, "
                    f"dry pass {cold_dry:.3f} s, real pass {cold_real:.3f} s"
                )
            else:
                print("  cold page cache: cannot write /proc/sys/vm/drop_caches (not root?)")
        child = child_pass(tree.layout.instances_path)
        assert child["disks"] == n_disks
        print(
            f"  peak RSS, fresh interpreter doing one dry pass: {child['peak'] / MIB:.1f} MiB "
            f"({child['imported'] / MIB:.1f} MiB after its imports; "
            f"that pass {child['seconds']:.3f} s)"
        )
        # Baseline: what Nova's image cache manager runs per disk.
        q_per = q_total / len(sample)
        ratio = q_per / (m_scan / n_disks)
        print(
            f"  baseline: qemu-img info -f qcow2 --output=json, {len(sample)} disks, sequential "
            f"subprocesses ({len(sample) // args.runs} after each round): {q_total:.2f} s, "
            f"{q_per * 1e3:.2f} ms per disk"
        )
        print(
            f"      per disk: scan {m_scan / n_disks * 1e6:.1f} us vs qemu-img info "
            f"{q_per * 1e6:.0f} us -> scan is {ratio:.0f}x faster"
        )
        print(
            f"      qemu-img info for all {n_disks} disks, extrapolated: {q_per * n_disks:.0f} s "
            f"({q_per * n_disks / m_real:.0f}x the real pass)"
        )
        if args.cold and cold_scan is not None:
            drop_caches()
            q_cold = qemu_info(qemu_img, sample)
            print(
                f"      cold page cache: qemu-img info {q_cold / len(sample) * 1e3:.2f} ms per disk"
                f" vs scan {cold_scan / n_disks * 1e6:.1f} us per disk "
                f"({q_cold / len(sample) / (cold_scan / n_disks):.0f}x); all {n_disks} disks "
                f"extrapolated {q_cold / len(sample) * n_disks:.0f} s"
            )
        worst = max(dry.median, real.median)
        verdict = "MET" if worst <= TARGET_S else "NOT MET"
        print(
            f"  target: a pass over {tree.folders} folders in <= {TARGET_S:.0f} s: {verdict} "
            f"(median of the slower pass, warm page cache: {worst:.3f} s)"
        )
        if cold_dry is not None and cold_real is not None:
            c = max(cold_dry, cold_real)
            print(
                f"          cold page cache: {c:.3f} s: "
                f"{'within' if c <= TARGET_S else 'over'} the target"
            )
        print(f"  uptime before: {load_before}")
        print(f"  uptime after:  {uptime()}   cpus: {os.cpu_count()}")
    finally:
        if args.keep:
            print(f"  kept {work}")
        else:
            t0 = time.perf_counter()
            shutil.rmtree(work, ignore_errors=True)
            print(f"  removed the work directory in {time.perf_counter() - t0:.1f} s (not timed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
