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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
