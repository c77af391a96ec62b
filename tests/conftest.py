"""Shared test helpers.

Tiers: ``tests/unit`` (no external programs), ``tests/integration`` (real
qemu-img, the image service on loopback, PostgreSQL, real Glance) and
``tests/e2e`` (real libvirt/QEMU boots). Outside CI a test whose real component
is missing skips with the reason; in CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.glance",
]


def missing(reason: str) -> None:
    """A real component is missing: skip outside CI, fail in CI."""
    if IN_CI:
        pytest.fail(f"required component missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_program(name: str) -> str:
    path = shutil.which(name) or (
        shutil.which(name, path="/usr/sbin:/sbin") if not name.startswith("/") else None
    )
    if path is None:
        missing(f"program {name!r} not installed")
        raise AssertionError("unreachable")
    return path


def qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    """Run ``qemu-io -f FMT -c CMD ... PATH`` (each of ``cmds`` one ``-c``; fails on error)."""
    from cowfleet import proc

    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    proc.run([*argv, str(path)])


def require_env(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        missing(f"environment variable {var} not set (run scripts/test.sh)")
        raise AssertionError("unreachable")
    return value


@contextmanager
def small_tmpfs(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for a disk-full test (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        missing(f"cannot mount a size-limited tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def o_direct_works(directory: Path) -> bool:
    """Whether files in ``directory`` can be opened with O_DIRECT (tmpfs before Linux
    6.6 and some FUSE filesystems refuse it)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".o-direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


LOOP_EXT4_BYTES = 512 * 1024 * 1024  # sparse: only what the tests write takes disk space


@pytest.fixture(scope="session")
def loop_ext4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A loop-mounted ext4 (one per session), for tests that need what ext4 can do
    (O_DIRECT, page-cache eviction) when their tmp folder's filesystem cannot (tmpfs
    before Linux 6.6, overlay and FUSE filesystems). Needs root, mkfs.ext4 and loop devices."""
    mkfs = require_program("mkfs.ext4")
    root = tmp_path_factory.mktemp("loop-ext4")
    image, mnt = root / "ext4.img", root / "mnt"
    with image.open("wb") as fh:
        fh.truncate(LOOP_EXT4_BYTES)
    made = subprocess.run([mkfs, "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        missing(f"mkfs.ext4 failed: {made.stderr.strip()}")
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "ext4", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        missing(
            f"cannot loop-mount an ext4 (root and loop devices needed): {mounted.stderr.strip()}"
        )
    try:
        yield mnt
    finally:
        # The loop device was set up with autoclear: unmounting releases it too.
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        image.unlink(missing_ok=True)


def dir_that_can(
    request: pytest.FixtureRequest, tmp_path: Path, probe: Callable[[Path], bool], what: str
) -> Path:
    """``tmp_path`` when ``probe`` says its filesystem can do ``what``, else a fresh folder
    on :func:`loop_ext4`. When ext4 cannot either, the kernel lacks the feature: a test
    that needs it fails in CI and skips elsewhere, saying so."""
    if probe(tmp_path):
        return tmp_path
    mnt: Path = request.getfixturevalue("loop_ext4")
    folder = Path(tempfile.mkdtemp(prefix="t-", dir=mnt))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    if not probe(folder):
        missing(f"{what} does not work on {tmp_path} nor on a loop-mounted ext4 ({folder})")
    return folder


def page_cache_eviction_works(directory: Path) -> bool:
    """Whether a file written in ``directory`` can be dropped from the page cache and its
    residency measured (``cowfleet.fsutil.cached_fraction``: cachestat(2) or RWF_NOWAIT)."""
    from cowfleet.fsutil import cached_fraction

    probe = directory / ".eviction-probe"
    try:
        probe.write_bytes(os.urandom(256 * 1024))
        fd = os.open(probe, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return cached_fraction(fd, 0, 256 * 1024) == 0.0
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


@pytest.fixture
def direct_io_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A folder whose filesystem accepts O_DIRECT (tmp_path, else a loop-mounted ext4)."""
    return dir_that_can(request, tmp_path, o_direct_works, "O_DIRECT")


@pytest.fixture
def evictable_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A folder whose files can be evicted from the page cache and their residency read
    (tmp_path, else a loop-mounted ext4)."""
    return dir_that_can(
        request,
        tmp_path,
        page_cache_eviction_works,
        "page-cache eviction (with cachestat(2) or RWF_NOWAIT reads to measure it)",
    )


def wait_until(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Call ``check`` until it returns something truthy and return that; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)
    return value
