"""Users of cowfleet.safeopen refuse planted names: the ephemeral and swap bases and
their temporary files, the inspector's path entry, and the image store's reads.

Each test plants a symlink or hard link to a victim file (or another file where a
base must be) and checks that the victim is unchanged and the error names the path
and the problem.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowfleet import proc
from cowfleet.compute.disks import reinspect_base
from cowfleet.compute.ephemeral import MIB, ensure_swap_base
from cowfleet.errors import (
    CommandError,
    LocalIOError,
    NotFoundError,
    UnsafeFileError,
    UnsafeImageError,
)
from cowfleet.formats.inspector import inspect_path
from cowfleet.images.server.store import FilesystemStore

VICTIM = b"not yours to overwrite\n" * 100


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(VICTIM)
    return v


@contextlib.contextmanager
def _no_lock(_dir: Path, _name: str) -> Iterator[None]:
    yield


class FakeMkswap:
    """Writes a swap signature into the path it is given, as mkswap does."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, argv: list[str], **_kw: Any) -> proc.Completed:
        self.paths.append(argv[-1])
        with open(argv[-1], "r+b") as fh:
            fh.seek(4086)
            fh.write(b"SWAPSPACE2")
        return proc.Completed(tuple(argv), 0, "", "", 0.0)


def swap(base_dir: Path, runner: FakeMkswap | None = None) -> Any:
    return ensure_swap_base(
        base_dir, base_dir.parent / "locks", 1, lock=_no_lock, runner=runner or FakeMkswap()
    )


# -- ephemeral and swap bases ------------------------------------------------------
def test_symlink_at_a_swap_base_is_refused(tmp_path: Path, victim: Path) -> None:
    base = tmp_path / "_base"
    base.mkdir()
    (base / "swap_1").symlink_to(victim)
    with pytest.raises(UnsafeFileError, match=r"refusing to follow symlink .*_base/swap_1"):
        swap(base)
    assert victim.read_bytes() == VICTIM


def test_hard_link_at_a_swap_base_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "_base"
    base.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(bytes(MIB))
    os.link(elsewhere, base / "swap_1")
    with pytest.raises(UnsafeFileError, match="swap_1 has 2 links"):
        swap(base)


def test_a_base_that_is_not_raw_of_its_size_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "_base"
    base.mkdir()
    qcow2 = bytearray(MIB)
    qcow2[:8] = b"QFI\xfb\x00\x00\x00\x03"  # a qcow2 planted where a raw base must be
    (base / "swap_1").write_bytes(bytes(qcow2))
    with pytest.raises(UnsafeImageError, match="swap_1 is not what cowfleet makes"):
        swap(base)
    (base / "swap_1").write_bytes(bytes(MIB // 2))  # raw, but the wrong size
    with pytest.raises(UnsafeImageError, match="524288 bytes"):
        swap(base)


def test_an_existing_base_is_checked_and_reused(tmp_path: Path) -> None:
    base = tmp_path / "_base"
    first = swap(base)
    assert first.created
    runner = FakeMkswap()
    again = swap(base, runner)
    assert not again.created and runner.paths == []
    st = os.lstat(base / "swap_1")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_size == MIB
    assert sorted(p.name for p in base.iterdir()) == ["swap_1"]  # no temporary left


def test_the_old_predictable_temp_name_is_not_written_through(tmp_path: Path, victim: Path) -> None:
    base = tmp_path / "_base"
    base.mkdir()
    (base / f".swap_1.tmp.{os.getpid()}").symlink_to(victim)
    runner = FakeMkswap()
    made = swap(base, runner)
    assert made.created and victim.read_bytes() == VICTIM
    # mkswap was handed our descriptor, not a name in the folder
    assert runner.paths == [runner.paths[0]] and runner.paths[0].startswith("/proc/")
    assert (base / "swap_1").read_bytes()[4086:4096] == b"SWAPSPACE2"


def test_a_failed_format_leaves_no_temporary(tmp_path: Path) -> None:
    base = tmp_path / "_base"

    def fail(argv: list[str], **_kw: Any) -> proc.Completed:
        raise CommandError("mkswap failed", argv=argv, returncode=1)

    with pytest.raises(CommandError):
        ensure_swap_base(base, tmp_path / "locks", 1, lock=_no_lock, runner=fail)
    assert list(base.iterdir()) == []


# -- the inspector's path entry ----------------------------------------------------
def test_strict_inspection_refuses_a_symlink_and_a_hard_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(bytes(MIB))
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeFileError, match="refusing to follow symlink"):
        inspect_path(tmp_path / "link")
    with pytest.raises(UnsafeFileError, match="refusing to follow symlink"):
        reinspect_base(tmp_path / "link", "raw", max_virtual_size=1 << 40)
    os.link(real, tmp_path / "hard")
    with pytest.raises(UnsafeFileError, match="has 2 links"):
        inspect_path(tmp_path / "hard")
    # a file the user names on the command line may be a symlink
    assert inspect_path(tmp_path / "link", strict=False).virtual_size == MIB


def test_strict_inspection_reads_the_checked_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is opened once: swapping it after the check changes nothing."""
    from cowfleet import safeopen
    from cowfleet.formats import inspector

    good = tmp_path / "base"
    good.write_bytes(bytes(MIB))
    evil = bytearray(MIB)
    evil[:8] = b"QFI\xfb\x00\x00\x00\x03"
    real_open_path = safeopen.open_path

    def open_then_swap(path: Any, **kw: Any) -> int:
        fd = real_open_path(path, **kw)
        swapped = tmp_path / "swap"
        swapped.write_bytes(bytes(evil))
        os.rename(swapped, good)  # the name now holds something else
        return fd

    monkeypatch.setattr(inspector.safeopen, "open_path", open_then_swap)
    insp = inspect_path(good)
    assert insp.format == "raw" and insp.virtual_size == MIB


# -- the image store's reads --------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "images", tmp_path / "staging")


def test_store_refuses_a_symlink_at_a_stored_name(store: FilesystemStore, victim: Path) -> None:
    iid = str(uuid.uuid4())
    (store.images_dir / iid).symlink_to(victim)
    with pytest.raises(LocalIOError, match=f"stored file of image {iid} was refused"):
        store.open_read(iid)
    with pytest.raises(LocalIOError):
        store.size(iid)
    store.delete(iid)  # removes the link, never the victim
    assert victim.read_bytes() == VICTIM
    assert not (store.images_dir / iid).is_symlink()


def test_store_refuses_a_hard_link_and_reads_its_own_files(
    store: FilesystemStore, victim: Path
) -> None:
    iid = str(uuid.uuid4())
    os.link(victim, store.images_dir / iid)
    with pytest.raises(LocalIOError, match="refused"):
        store.open_read(iid)
    (store.images_dir / iid).unlink()
    staged = store.begin_write(iid)
    staged.write(b"image bytes")
    store.commit(staged)
    fd = store.open_read(iid)
    try:
        assert os.pread(fd, 100, 0) == b"image bytes"
    finally:
        os.close(fd)
    assert store.size(iid) == len(b"image bytes")
    with pytest.raises(NotFoundError):
        store.open_read(str(uuid.uuid4()))


def test_store_refuses_a_symlinked_store_folder(tmp_path: Path, victim: Path) -> None:
    store = FilesystemStore(tmp_path / "images", tmp_path / "staging")
    iid = str(uuid.uuid4())
    other = tmp_path / "other"
    other.mkdir()
    (other / iid).write_bytes(b"planted")
    store.images_dir.rmdir()
    store.images_dir.symlink_to(other)
    with pytest.raises(UnsafeFileError, match="refusing to follow symlink"):
        store.open_read(iid)
