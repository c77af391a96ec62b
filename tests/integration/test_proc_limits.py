"""Resource limits through the real util-linux ``prlimit`` (cowfleet.proc.Limits)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cowfleet import proc, qemuimg
from cowfleet.errors import CommandError
from tests.conftest import require_program

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _prlimit() -> None:
    require_program("prlimit")


def test_limits_are_set_in_the_child() -> None:
    limits = proc.Limits(cpu_seconds=7, address_space=1536 * MiB)
    code = "import resource as r; print(*r.getrlimit(r.RLIMIT_CPU), *r.getrlimit(r.RLIMIT_AS))"
    out = proc.run([sys.executable, "-c", code], limits=limits)
    assert out.stdout.split() == ["7", "7", str(1536 * MiB), str(1536 * MiB)]


def test_address_space_limit_is_enforced() -> None:
    grab = [sys.executable, "-c", "b = bytearray(600 * 1024 * 1024); print(len(b))"]
    assert proc.run(grab).stdout.strip() == str(600 * MiB)  # fine without a limit
    tiny = proc.Limits(cpu_seconds=None, address_space=256 * MiB)
    with pytest.raises(CommandError) as info:
        proc.run(grab, limits=tiny)
    assert "MemoryError" in info.value.stderr
    assert info.value.argv == grab


def test_cpu_limit_is_enforced() -> None:
    spin = [sys.executable, "-c", "while True: pass"]
    with pytest.raises(CommandError) as info:
        proc.run(spin, limits=proc.Limits(cpu_seconds=1, address_space=None), timeout=60)
    assert info.value.returncode is not None and info.value.returncode < 0  # SIGXCPU/SIGKILL


def test_qemu_img_runs_under_the_limits(tmp_path: Path) -> None:
    require_program("qemu-img")
    img = tmp_path / "a.qcow2"
    proc.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"])
    info = qemuimg.info(img, "qcow2")
    assert info.virtual_size == 64 * MiB
    assert proc.UNTRUSTED.prefix()[0] == "prlimit"
