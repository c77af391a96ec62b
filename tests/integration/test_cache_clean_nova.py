"""``cache list`` and ``cache clean --dry-run`` on a Nova compute node's instances path.

The directory is made the way Nova makes it, with real qemu-img: raw bases named
``_base/<sha1>`` (no cowfleet metadata), instance disks that are qcow2 overlays
with absolute backing paths, a disk whose chain goes through an intermediate
qcow2 in the instance folder (relative backing name) before reaching its base,
``ephemeral_*``/``swap_*`` bases, a resized base ``<sha1>_20``, ``locks/nova-*``
lock files, ``disk.info`` files, and an orphaned ``<sha1>.part``. One instance
has a ``disk.config`` that ``disk.info`` pins to raw but whose bytes are a qcow2
header naming an otherwise unused base: guest bytes, which must not be trusted.

The dry run must change nothing at all (every path's mode, size, mtime, ctime and
inode compared; no lock file created) and report the right decisions. One real
pass on a second node built the same way removes exactly the old unused base and
the orphaned ``.part``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_program

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1024 * 1024
DAY = 86400


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class NovaNode:
    root: Path
    used: str  # base of uuid1/disk (direct)
    chained: str  # base under uuid2/disk -> uuid2/overlay-1.qcow2
    old_unused: str  # nobody uses it (except a forged raw disk.config), 3 days old
    young_unused: str  # nobody uses it, fresh
    part: str  # orphaned download, 3 days old
    ephemeral: str
    swap: str
    resized: str
    uuid1: str
    uuid2: str

    @property
    def base(self) -> Path:
        return self.root / "_base"


def _qemu_img(qemu_img: str, *args: str) -> None:
    subprocess.run([qemu_img, *args], check=True, capture_output=True)


def _raw(path: Path, size: int, tag: bytes) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(tag)
    os.chmod(path, 0o644)


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def make_nova_node(root: Path, qemu_img: str) -> NovaNode:
    base = root / "_base"
    locks = root / "locks"
    base.mkdir(parents=True)
    locks.mkdir()
    used, chained, old_unused, young_unused, part = (
        _sha1(f"image-{i}") for i in ("used", "chained", "old", "young", "part")
    )
    node = NovaNode(
        root=root,
        used=used,
        chained=chained,
        old_unused=old_unused,
        young_unused=young_unused,
        part=part + ".part",
        ephemeral="ephemeral_1_0706d66",
        swap="swap_512",
        resized=chained + "_20",
        uuid1=str(uuid.uuid4()),
        uuid2=str(uuid.uuid4()),
    )
    for name in (used, chained, old_unused, young_unused):
        _raw(base / name, 2 * MIB, name.encode())
    _raw(base / node.part, 1 * MIB, b"partial")
    _raw(base / node.ephemeral, 1024 * MIB, b"")  # sparse, as Nova's mkfs'd base
    _raw(base / node.swap, 512 * MIB, b"")
    _raw(base / node.resized, 2 * MIB, b"resized")
    for name in (used, chained, old_unused, node.part, node.ephemeral, node.swap, node.resized):
        (locks / f"nova-{name}").touch()

    # instance 1: disk -> _base/used, disk.local -> _base/ephemeral, and a raw
    # disk.config whose bytes are a qcow2 header naming _base/old_unused
    one = root / node.uuid1
    one.mkdir()
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base / used),
              str(one / "disk"), "1G")  # fmt: skip
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
              str(base / node.ephemeral), str(one / "disk.local"), "1G")  # fmt: skip
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
              str(base / old_unused), str(one / "disk.config"), "64M")  # fmt: skip
    (one / "disk.info").write_text(
        json.dumps(
            {
                str(one / "disk"): "qcow2",
                str(one / "disk.local"): "qcow2",
                str(one / "disk.config"): "raw",
            }
        )
    )
    (one / "console.log").write_text("")
    (one / "libvirt.xml").write_text("<domain type='kvm'/>\n")

    # instance 2: disk -> overlay-1.qcow2 (relative name) -> _base/chained; disk.swap
    two = root / node.uuid2
    two.mkdir()
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base / chained),
              str(two / "overlay-1.qcow2"), "1G")  # fmt: skip
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "overlay-1.qcow2",
              str(two / "disk"), "1G")  # fmt: skip
    _qemu_img(qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base / node.swap),
              str(two / "disk.swap"), "512M")  # fmt: skip
    (two / "disk.info").write_text(
        json.dumps({str(two / "disk"): "qcow2", str(two / "disk.swap"): "qcow2"})
    )

    # Nova's times: bases are touched when used; these have been in _base for days
    for name in (used, chained, old_unused, node.ephemeral, node.swap, node.resized, node.part):
        _age(base / name, 3 * DAY)
    return node


def snapshot(root: Path) -> dict[str, tuple[int, ...]]:
    """Every path under ``root`` (itself included) with what a change would touch."""
    out: dict[str, tuple[int, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                st.st_nlink,
                st.st_blocks,
            )
    return out


def _cowfleet(home: Path, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(home)
    env["COWFLEET_MIN_FREE_PERCENT"] = "0"  # no free-space eviction, whatever this disk holds
    proc = subprocess.run(
        [sys.executable, "-m", "cowfleet", *args, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout), proc.stderr


def test_dry_run_on_a_nova_node_changes_nothing_and_decides_right(tmp_path: Path) -> None:
    qemu_img = require_program("qemu-img")
    node = make_nova_node(tmp_path / "nova" / "instances", qemu_img)
    home = tmp_path / "home"
    before = snapshot(node.root)
    time.sleep(0.05)  # a change made now would show in mtime/ctime nanoseconds

    listing, _ = _cowfleet(home, "cache", "list", "--instances-path", str(node.root))
    report, err = _cowfleet(home, "cache", "clean", "--dry-run", "--instances-path", str(node.root))

    after = snapshot(node.root)
    assert after == before, {
        k: (before.get(k), after.get(k))
        for k in set(before) | set(after)
        if before.get(k) != after.get(k)
    }
    assert not [p for p in (node.root / "locks").iterdir() if p.name.startswith("cowfleet-")]
    assert not (node.base / ".cowfleet").exists()

    entries = {e["name"]: e for e in listing}
    assert set(entries) == {
        node.used,
        node.chained,
        node.old_unused,
        node.young_unused,
        node.part,
        node.ephemeral,
        node.swap,
        node.resized,
    }
    assert entries[node.used]["users"] == [node.uuid1]
    assert entries[node.chained]["users"] == [node.uuid2]  # through overlay-1.qcow2
    assert entries[node.ephemeral]["users"] == [node.uuid1]
    assert entries[node.swap]["users"] == [node.uuid2]
    assert entries[node.old_unused]["users"] == []  # the raw disk.config is not parsed
    assert entries[node.young_unused]["users"] == []
    for name in (node.used, node.chained, node.old_unused, node.young_unused):
        assert (entries[name]["kind"], entries[name]["state"]) == ("base", "foreign")
    assert (entries[node.part]["kind"], entries[node.part]["state"]) == ("part", "stray")
    assert entries[node.resized]["kind"] == "unknown"

    assert report["dry_run"] is True
    assert (report["instances"], report["disks"]) == (2, 4)  # disk.config is not read
    assert report["unreadable"] == [] and report["broken"] == []
    got = {d["name"]: d for d in report["decisions"]}
    assert set(got) == set(entries)
    assert not any(d["done"] for d in report["decisions"])
    for name, user in (
        (node.used, node.uuid1),
        (node.chained, node.uuid2),
        (node.ephemeral, node.uuid1),
        (node.swap, node.uuid2),
    ):
        assert (got[name]["action"], got[name]["users"]) == ("keep", [user]), got[name]
        assert got[name]["reason"] == "in use by 1 instances"
    old = got[node.old_unused]
    assert (old["action"], old["done"], old["users"]) == ("remove", False, [])
    assert old["reason"].startswith("unused for 3.0 d"), old
    young = got[node.young_unused]
    assert young["action"] == "keep" and "removed after" in young["reason"], young
    part = got[node.part]
    assert (part["action"], part["done"], part["kind"]) == ("remove", False, "part")
    assert "abandoned download" in part["reason"]
    assert got[node.resized]["action"] == "keep"  # not ours, not Nova's base: left alone
    assert report["freed_bytes"] == old["allocated"] + part["allocated"]
    assert "warning" not in err.lower()


def test_real_pass_on_a_nova_node_removes_only_the_old_unused_and_the_part(
    tmp_path: Path,
) -> None:
    qemu_img = require_program("qemu-img")
    node = make_nova_node(tmp_path / "nova2" / "instances", qemu_img)
    home = tmp_path / "home"
    before = snapshot(node.root)
    contents = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in node.base.iterdir()
        if p.stat().st_size <= 4 * MIB
    }
    started = time.time()

    report, _err = _cowfleet(home, "cache", "clean", "--instances-path", str(node.root))

    removed = sorted(d["name"] for d in report["decisions"] if d["action"] == "remove")
    assert removed == sorted([node.old_unused, node.part])
    assert all(d["done"] for d in report["decisions"] if d["action"] == "remove")
    left = {p.name for p in node.base.iterdir()}
    assert left == {
        node.used,
        node.chained,
        node.young_unused,
        node.ephemeral,
        node.swap,
        node.resized,
    }
    for name in left:
        if name in contents:
            digest = hashlib.sha256((node.base / name).read_bytes()).hexdigest()
            assert digest == contents[name], name
    # bases in use had their last use (their mtime, as Nova keeps it) set to now
    for name in (node.used, node.chained, node.ephemeral, node.swap):
        assert (node.base / name).stat().st_mtime >= started - 1, name
    # the instance folders are untouched
    after = snapshot(node.root)
    for key, value in before.items():
        if key.startswith((node.uuid1, node.uuid2)):
            assert after[key] == value, key
    # every chain still opens in qemu
    for disk, length in (
        (node.root / node.uuid1 / "disk", 2),
        (node.root / node.uuid1 / "disk.local", 2),
        (node.root / node.uuid2 / "disk", 3),
        (node.root / node.uuid2 / "disk.swap", 2),
    ):
        proc = subprocess.run(
            [qemu_img, "info", "--backing-chain", "-f", "qcow2", "--output=json", str(disk)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)) == length
    # Nova's lock files are left as they were
    for name in (node.used, node.old_unused, node.part):
        assert (node.root / "locks" / f"nova-{name}").is_file()
