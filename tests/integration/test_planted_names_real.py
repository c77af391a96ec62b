"""Planted names against the real programs: ``cowfleet image download`` and the image
service as subprocesses on loopback, and ephemeral/swap bases made by real mkfs and
mkswap through a descriptor path (see cowfleet.safeopen)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cowfleet.compute.ephemeral import MIB, ensure_ephemeral_base, ensure_swap_base
from cowfleet.errors import UnsafeFileError
from tests.conftest import missing, require_program, small_tmpfs
from tests.fixtures.images import ImageService
from tests.integration.test_client_embedded import cli

pytestmark = pytest.mark.integration

VICTIM = b"a file the download must never touch\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(VICTIM)
    return v


def test_cli_download_refuses_planted_names_and_checks_the_destination_first(
    image_service: ImageService, tmp_path: Path, victim: Path
) -> None:
    data = os.urandom(MIB + 3)
    image_service.upload("img", data)
    dl = tmp_path / "dl"
    dl.mkdir()
    dest = dl / "img.raw"

    (dl / "img.raw.part").symlink_to(victim)
    done = cli(image_service, "download", "img", "--file", str(dest))
    assert done.returncode == 2, done.stderr
    assert "refusing to follow symlink" in done.stderr and "img.raw.part" in done.stderr
    assert victim.read_bytes() == VICTIM and not dest.exists()
    (dl / "img.raw.part").unlink()

    dest.symlink_to(victim)
    done = cli(image_service, "download", "img", "--file", str(dest))
    assert done.returncode == 2 and "refusing to follow symlink" in done.stderr
    assert victim.read_bytes() == VICTIM
    dest.unlink()

    done = cli(image_service, "download", "img", "--file", str(dl))
    assert done.returncode == 2 and "is a folder" in done.stderr
    done = cli(image_service, "download", "img", "--file", str(dl / "missing" / "x"))
    assert done.returncode == 2 and "missing" in done.stderr
    assert list(dl.iterdir()) == []

    os.link(victim, dest)  # a hard link at the final name is replaced, not written
    done = cli(image_service, "download", "img", "--file", str(dest))
    assert done.returncode == 0, done.stderr
    assert victim.read_bytes() == VICTIM
    st = os.lstat(dest)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and dest.read_bytes() == data
    assert sorted(p.name for p in dl.iterdir()) == ["img.raw"]


def test_cli_download_into_a_read_only_folder_fails_before_fetching(
    image_service: ImageService, tmp_path: Path
) -> None:
    image_service.upload("img", os.urandom(MIB))
    with small_tmpfs(tmp_path / "ro", "1m") as ro:
        r = subprocess.run(
            ["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            missing(f"cannot remount a tmpfs read-only: {r.stderr.strip()}")
        done = cli(image_service, "download", "img", "--file", str(ro / "img"))
        assert done.returncode == 2
        assert "cannot write to folder" in done.stderr
        assert list(ro.iterdir()) == []


def test_image_service_never_serves_a_planted_file(
    image_service: ImageService, victim: Path
) -> None:
    image_id = image_service.upload("img", b"the real image bytes")
    stored = image_service.data_dir / "images" / image_id
    stored.unlink()
    stored.symlink_to(victim)
    resp = httpx.get(
        f"{image_service.url}/v2/images/{image_id}/file",
        headers=image_service.headers,
        timeout=30,
    )
    assert resp.status_code == 500
    assert VICTIM not in resp.content and str(stored) not in resp.text
    assert "refusing to follow symlink" in image_service.log_path.read_text()


@contextlib.contextmanager
def _no_lock(_dir: Path, _name: str) -> Iterator[None]:
    yield


def test_real_mkfs_and_mkswap_format_through_the_descriptor(tmp_path: Path, victim: Path) -> None:
    require_program("mkfs.ext4")
    require_program("mkswap")
    base = tmp_path / "_base"
    locks = tmp_path / "locks"
    eph = ensure_ephemeral_base(base, locks, 1, "ext4", lock=_no_lock)
    swap = ensure_swap_base(base, locks, 64, lock=_no_lock)
    assert eph.created and swap.created
    with eph.path.open("rb") as fh:
        fh.seek(1024 + 56)
        assert fh.read(2) == b"\x53\xef"  # the ext4 superblock magic
    page = os.sysconf("SC_PAGE_SIZE")
    with swap.path.open("rb") as fh:
        fh.seek(page - 10)
        assert fh.read(10) == b"SWAPSPACE2"
    assert not ensure_ephemeral_base(base, locks, 1, "ext4", lock=_no_lock).created
    assert sorted(p.name for p in base.iterdir()) == sorted([eph.path.name, "swap_64"])
    swap.path.unlink()
    swap.path.symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="refusing to follow symlink"):
        ensure_swap_base(base, locks, 64, lock=_no_lock)
    assert victim.read_bytes() == VICTIM
