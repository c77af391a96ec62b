"""Issue 13, item 3: ``node run`` survives a real I/O error under a base.

The base lives on a filesystem whose blocks under the base answer EIO:

- where the kernel has device-mapper: ext4 on a ``dmsetup`` device over a loop
  device; once the base is written, the table is reloaded so the base's
  sectors (found with ``filefrag``) map to the ``error`` target and every other
  sector stays ``linear``;
- where it has none (some VM kernels are built without it): btrfs on a loop
  device, with one byte of the base's data flipped in the backing file while
  unmounted, so the data checksum fails and the kernel answers EIO.

Either way the error comes from the kernel on a real read. The running
``node run`` re-verifies the base, marks it failed, quarantines it (a rename:
metadata blocks still read fine), logs it at ERROR, keeps running pass after
pass, and exits 0 on SIGTERM, with no traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing, require_program
from tests.integration.test_node_run import (
    MIB,
    PASS_RE,
    Node,
    _image,
    _remote,
    _stop,
    _wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

Breaker = Callable[[Path], None]


def _run(*argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _dm_works(dmsetup: str) -> bool:
    """Whether the kernel has device-mapper (``dmsetup version`` names its driver)."""
    proc = subprocess.run([dmsetup, "version"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and "Driver version" in proc.stdout


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _extents(filefrag: str, path: Path) -> list[tuple[int, int]]:
    """Physical extents of ``path`` as (first sector, sectors), from ``filefrag -e -b512``."""
    out = _run(filefrag, "-e", "-b512", str(path))
    found = []
    for m in re.finditer(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", out, re.MULTILINE):
        first, last = int(m.group(1)), int(m.group(2))
        found.append((first, last - first + 1))
    assert found, out
    return sorted(found)


def _error_table(device: str, sectors: int, bad: list[tuple[int, int]]) -> str:
    """A dm table: ``linear`` onto ``device`` everywhere except ``error`` over ``bad``."""
    lines, at = [], 0
    for first, count in bad:
        if first > at:
            lines.append(f"{at} {first - at} linear {device} {at}")
        lines.append(f"{first} {count} error")
        at = first + count
    if at < sectors:
        lines.append(f"{at} {sectors - at} linear {device} {at}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def faulty_fs(tmp_path: Path) -> Iterator[tuple[Path, Breaker]]:
    """A mounted filesystem, and a function that makes reads of one of its files fail (EIO)."""
    dmsetup = require_program("dmsetup")
    losetup = require_program("losetup")
    require_program("filefrag")
    if os.geteuid() != 0:
        missing("loop devices and mounts need root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    backing = tmp_path / "disk.img"
    undo: list[list[str]] = []
    try:
        if _dm_works(dmsetup):
            yield from _dm_fs(backing, mnt, dmsetup, losetup, undo)
        else:
            yield from _btrfs_fs(backing, mnt, losetup, undo)
    finally:
        for argv in reversed(undo):
            subprocess.run(argv, capture_output=True, timeout=60)


def _dm_fs(
    backing: Path, mnt: Path, dmsetup: str, losetup: str, undo: list[list[str]]
) -> Iterator[tuple[Path, Breaker]]:
    mkfs = require_program("mkfs.ext4")
    filefrag = require_program("filefrag")
    with open(backing, "wb") as fh:
        fh.truncate(64 * MIB)
    loop = _run(losetup, "-f", "--show", str(backing)).strip()
    undo.append([losetup, "-d", loop])
    sectors = int(_run("blockdev", "--getsz", loop))
    name = f"cowfleet-eio-{uuid.uuid4().hex[:12]}"
    _run(dmsetup, "create", name, stdin=f"0 {sectors} linear {loop} 0\n")
    undo.append([dmsetup, "remove", "--retry", name])
    dev = f"/dev/mapper/{name}"
    _run(mkfs, "-q", "-F", dev)
    _run("mount", dev, str(mnt))
    undo.append(["umount", "-l", str(mnt)])

    def break_file(path: Path) -> None:
        _drop_cache(path)
        table = _error_table(loop, sectors, _extents(filefrag, path))
        _run(dmsetup, "suspend", name)
        try:
            _run(dmsetup, "load", name, stdin=table)
        finally:
            _run(dmsetup, "resume", name)
        _drop_cache(path)

    yield mnt, break_file


def _btrfs_fs(
    backing: Path, mnt: Path, losetup: str, undo: list[list[str]]
) -> Iterator[tuple[Path, Breaker]]:
    mkfs = require_program("mkfs.btrfs")
    with open(backing, "wb") as fh:
        fh.truncate(256 * MIB)
    loop = _run(losetup, "-f", "--show", str(backing)).strip()
    undo.append([losetup, "-d", loop])
    _run(mkfs, "-q", "-f", loop)
    _run("mount", loop, str(mnt))
    undo.append(["umount", "-l", str(mnt)])

    def break_file(path: Path) -> None:
        nonlocal loop
        size = path.stat().st_size
        at = (size // 2) & ~4095
        with open(path, "rb") as fh:
            fh.seek(at)
            sample = fh.read(4096)
        _run("umount", str(mnt))
        _run(losetup, "-d", loop)
        with open(backing, "r+b") as fh:
            raw = fh.read()
            where = raw.find(sample)
            assert where >= 0 and raw.find(sample, where + 1) < 0, "sample not unique"
            fh.seek(where + 100)
            fh.write(bytes([sample[100] ^ 0xFF]))
            fh.flush()
            os.fsync(fh.fileno())
        loop = _run(losetup, "-f", "--show", str(backing)).strip()
        undo.append([losetup, "-d", loop])
        _run("mount", loop, str(mnt))

    yield mnt, break_file


def test_read_error_under_a_base_is_quarantined_and_node_run_goes_on(
    tmp_path: Path, faulty_fs: tuple[Path, Breaker], image_service: Any
) -> None:
    mnt, break_file = faulty_fs
    instances = mnt / "instances"
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env.update(COWFLEET_HOME=str(home), COWFLEET_DRIVER="none", COWFLEET_MIN_FREE_PERCENT="0")
    node = Node(home, instances, env, tmp_path)
    inst = ["--instances-path", str(instances)]
    image_id = image_service.upload("on-bad-disk", _image(4 * MIB, b"EIO!"))
    fetched = json.loads(
        node.ok(
            "cache", "fetch", image_id, *inst, "-o", "json", env=_remote(node, image_service)
        ).stdout
    )
    base = Path(fetched["path"])

    break_file(base)
    # the fault is real: the kernel answers EIO
    with open(base, "rb") as fh, pytest.raises(OSError) as info:
        while fh.read(1 << 20):
            pass
    assert info.value.errno == errno.EIO

    run_env = dict(env, COWFLEET_VERIFY_INTERVAL="0.001", COWFLEET_VERIFY_RATE="1073741824")
    proc, log = node.start("node", "run", "--interval", "0.3", *inst, env=run_env)
    try:
        text = _wait_for(log, proc, PASS_RE, 3)  # still passing after the fault
    finally:
        if proc.poll() is None:
            _took, text = _stop(proc, log, within=10)
    assert "Traceback" not in text, text
    failed = [ln for ln in text.splitlines() if "failed verification" in ln]
    assert failed and failed[0].startswith("ERROR"), text
    assert "read error" in failed[0] and "Input/output error" in failed[0], failed[0]
    assert any(ln.startswith("ERROR") and "QUARANTINED" in ln for ln in text.splitlines()), text
    assert not os.path.lexists(base)
    listing = json.loads(node.ok("cache", "list", *inst, "-o", "json").stdout)
    assert [(e["kind"], e["image_id"]) for e in listing] == [("quarantined", image_id)]
    assert "Input/output error" in listing[0]["failure"]
