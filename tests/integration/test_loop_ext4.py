"""The loop-mounted ext4 that tests fall back to when their tmp folder's filesystem cannot
do what they need (``tests/conftest.py``: ``loop_ext4``, ``dir_that_can``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import dir_that_can, o_direct_works, page_cache_eviction_works

pytestmark = pytest.mark.integration


def _mount_of(path: Path) -> tuple[str, str]:
    """(source, fstype) of the mount point ``path``."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target, fstype, *_ = line.split()
        if Path(target) == path:
            return source, fstype
    raise AssertionError(f"{path} is not a mount point")


def test_loop_ext4_can_do_what_the_tests_need(loop_ext4: Path) -> None:
    source, fstype = _mount_of(loop_ext4)
    assert fstype == "ext4" and source.startswith("/dev/loop"), (source, fstype)
    assert o_direct_works(loop_ext4 / "probe")
    assert page_cache_eviction_works(loop_ext4)


def test_a_folder_that_cannot_gets_one_on_the_loop_ext4(
    request: pytest.FixtureRequest, tmp_path: Path, loop_ext4: Path
) -> None:
    # A probe that refuses tmp_path stands for a filesystem that cannot (tmpfs, overlay).
    folder = dir_that_can(request, tmp_path, lambda d: d != tmp_path, "something")
    assert folder.parent == loop_ext4 and folder.is_dir()
    assert dir_that_can(request, tmp_path, lambda d: True, "anything") == tmp_path
