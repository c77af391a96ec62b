"""The one opener for files in folders others could write to (cowfleet.safeopen)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfleet import safeopen
from cowfleet.errors import LocalIOError, UnsafeFileError


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "d"
    d.mkdir()
    fd = safeopen.open_dir(d)
    yield d, fd
    os.close(fd)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(b"victim")
    return v


def test_reuses_a_private_regular_file(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    (d / "f").write_bytes(b"ok")
    fd = safeopen.open_existing(dfd, "f", display=d / "f")
    try:
        assert os.pread(fd, 10, 0) == b"ok"
        assert os.get_blocking(fd)  # O_NONBLOCK was only for the open
    finally:
        os.close(fd)


def test_symlink_is_refused(folder: tuple[Path, int], victim: Path) -> None:
    d, dfd = folder
    (d / "f").symlink_to(victim)
    with pytest.raises(UnsafeFileError, match=r"refusing to follow symlink .*/d/f"):
        safeopen.open_existing(dfd, "f", display=d / "f", flags=os.O_RDWR)
    with pytest.raises(UnsafeFileError, match="a symlink is already there"):
        safeopen.create(dfd, "f", display=d / "f")
    assert victim.read_bytes() == b"victim"


def test_dangling_symlink_is_not_created_through(folder: tuple[Path, int], tmp_path: Path) -> None:
    d, dfd = folder
    (d / "f").symlink_to(tmp_path / "target")
    with pytest.raises(UnsafeFileError):
        safeopen.create(dfd, "f", display=d / "f")
    assert not (tmp_path / "target").exists()


def test_hard_link_is_refused(folder: tuple[Path, int], victim: Path) -> None:
    d, dfd = folder
    os.link(victim, d / "f")
    with pytest.raises(UnsafeFileError, match="has 2 links"):
        safeopen.open_existing(dfd, "f", display=d / "f")


def test_fifo_is_refused_without_blocking(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    os.mkfifo(d / "f")
    with pytest.raises(UnsafeFileError, match=r"not a regular file .*a FIFO"):
        safeopen.open_existing(dfd, "f", display=d / "f")


def test_folder_is_refused_as_a_file(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    (d / "f").mkdir()
    with pytest.raises(UnsafeFileError, match=r"not a regular file .*a folder"):
        safeopen.open_existing(dfd, "f", display=d / "f")


def test_someone_elses_file_is_refused(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    (d / "f").write_bytes(b"theirs")
    os.chown(d / "f", 4321, 4321)
    with pytest.raises(UnsafeFileError, match="owned by uid 4321"):
        safeopen.open_existing(dfd, "f", display=d / "f")


def test_roots_file_is_accepted(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    (d / "f").write_bytes(b"root's")
    os.chown(d / "f", 0, 0)
    os.close(safeopen.open_existing(dfd, "f", display=d / "f"))


def test_block_device_only_when_allowed(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    os.mknod(d / "b", 0o600 | 0o060000, os.makedev(7, 200))  # a loop device node
    with pytest.raises(UnsafeFileError, match="a block device"):
        safeopen.open_existing(dfd, "b", display=d / "b")


def test_missing_name_raises_file_not_found(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    with pytest.raises(FileNotFoundError):
        safeopen.open_existing(dfd, "nope", display=d / "nope")
    with pytest.raises(LocalIOError, match="no such file"):
        safeopen.open_path(d / "nope")


def test_create_is_exclusive_and_names_are_relative_to_the_folder_fd(
    tmp_path: Path, folder: tuple[Path, int]
) -> None:
    d, dfd = folder
    fd = safeopen.create(dfd, "new", display=d / "new", mode=0o600)
    os.close(fd)
    with pytest.raises(UnsafeFileError, match="something is already there"):
        safeopen.create(dfd, "new", display=d / "new")
    # Moving the folder away and planting a symlink at its name changes nothing.
    d.rename(tmp_path / "moved")
    d.symlink_to(tmp_path / "elsewhere")
    safeopen.rename(dfd, "new", dfd, "renamed", display="renamed")
    assert (tmp_path / "moved" / "renamed").is_file()
    fd = os.open(tmp_path / "moved" / "renamed", os.O_RDONLY)
    try:
        assert safeopen.same_file(dfd, "renamed", fd)
    finally:
        os.close(fd)


def test_folder_symlink_and_non_folder_are_refused(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafeFileError, match="refusing to follow symlink"):
        safeopen.open_dir(tmp_path / "link")
    with pytest.raises(UnsafeFileError, match="is not a folder"):
        safeopen.open_dir(victim)
    with pytest.raises(LocalIOError, match="cannot open folder"):
        safeopen.open_dir(tmp_path / "missing")


def test_rename_replaces_a_symlink_without_following_it(
    folder: tuple[Path, int], victim: Path
) -> None:
    d, dfd = folder
    (d / "dst").symlink_to(victim)
    os.close(safeopen.create(dfd, "src", display=d / "src"))
    safeopen.rename(dfd, "src", dfd, "dst", display=d / "dst")
    assert not (d / "dst").is_symlink() and victim.read_bytes() == b"victim"


def test_unlink_if_same_leaves_a_replaced_name(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    fd = safeopen.create(dfd, "f", display=d / "f")
    try:
        os.rename(d / "f", d / "g")
        (d / "f").write_bytes(b"someone else's")
        assert not safeopen.unlink_if_same(dfd, "f", fd)
        assert (d / "f").read_bytes() == b"someone else's"
        assert safeopen.unlink_if_same(dfd, "g", fd)
        assert not (d / "g").exists()
    finally:
        os.close(fd)


def test_fd_path_reaches_the_open_file_whatever_its_name(folder: tuple[Path, int]) -> None:
    d, dfd = folder
    fd = safeopen.create(dfd, "f", display=d / "f")
    try:
        os.unlink(d / "f")
        with open(safeopen.fd_path(fd), "r+b") as fh:
            fh.write(b"hello")
        assert os.pread(fd, 5, 0) == b"hello"
    finally:
        os.close(fd)
