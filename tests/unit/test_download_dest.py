"""``image download`` never writes through a planted name and checks its destination first.

Each test plants something at ``DEST`` or ``DEST.part`` (a symlink or hard link to a
victim file, someone else's file, a folder) and checks that the victim is unchanged,
the error names the problem, and nothing is left behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest

from cowfleet.errors import (
    BackendUnavailableError,
    IntegrityError,
    LocalIOError,
    UnsafeFileError,
    UsageError,
)
from cowfleet.fetch.tofile import check_destination
from tests.unit.test_client import DATA, IID, FlakyFile, make, record

VICTIM = b"precious bytes that belong to someone else\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "victim"
    path.write_bytes(VICTIM)
    return path


@pytest.fixture
def dl(tmp_path: Path) -> Path:
    folder = tmp_path / "dl"
    folder.mkdir()
    return folder


def test_symlink_at_part_is_refused_and_the_victim_untouched(dl: Path, victim: Path) -> None:
    (dl / "img.part").symlink_to(victim)
    server = FlakyFile(cut=len(DATA) + 1)
    with pytest.raises(UnsafeFileError, match=r"refusing to follow symlink .*img\.part"):
        make(server).download(IID, dl / "img")
    assert victim.read_bytes() == VICTIM
    assert server.ranges_seen == []  # refused before fetching
    assert not (dl / "img").exists()
    assert (dl / "img.part").is_symlink()  # not ours to remove


def test_hard_link_at_part_is_refused(dl: Path, victim: Path) -> None:
    os.link(victim, dl / "img.part")
    with pytest.raises(UnsafeFileError, match=r"img\.part has 2 links"):
        make(FlakyFile(cut=len(DATA) + 1)).download(IID, dl / "img")
    assert victim.read_bytes() == VICTIM
    assert not (dl / "img").exists()


def test_part_owned_by_someone_else_is_refused(dl: Path) -> None:
    part = dl / "img.part"
    part.write_bytes(DATA[:1000])
    os.chown(part, 4242, 4242)
    with pytest.raises(UnsafeFileError, match=r"img\.part is owned by uid 4242"):
        make(FlakyFile(cut=len(DATA) + 1)).download(IID, dl / "img")
    assert part.read_bytes() == DATA[:1000]


def test_fifo_at_part_is_refused_without_blocking(dl: Path) -> None:
    os.mkfifo(dl / "img.part")
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        make(FlakyFile(cut=len(DATA) + 1)).download(IID, dl / "img")


def test_symlink_at_destination_is_refused(dl: Path, victim: Path) -> None:
    (dl / "img").symlink_to(victim)
    server = FlakyFile(cut=len(DATA) + 1)
    with pytest.raises(UnsafeFileError, match="refusing to follow symlink"):
        make(server).download(IID, dl / "img")
    assert victim.read_bytes() == VICTIM
    assert server.ranges_seen == []
    assert sorted(p.name for p in dl.iterdir()) == ["img"]


def test_hard_link_at_destination_is_replaced_not_written(dl: Path, victim: Path) -> None:
    os.link(victim, dl / "img")
    make(FlakyFile(cut=len(DATA) + 1)).download(IID, dl / "img")
    assert victim.read_bytes() == VICTIM
    st = os.lstat(dl / "img")
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert (dl / "img").read_bytes() == DATA


def test_symlinked_destination_folder_is_refused(tmp_path: Path, dl: Path) -> None:
    (tmp_path / "via").symlink_to(dl)
    with pytest.raises(UnsafeFileError, match="refusing to follow symlink"):
        make(FlakyFile(cut=len(DATA) + 1)).download(IID, tmp_path / "via" / "img")
    assert list(dl.iterdir()) == []


def test_folder_destination_fails_before_any_byte(dl: Path) -> None:
    server = FlakyFile(cut=len(DATA) + 1)
    with pytest.raises(UsageError, match="is a folder"):
        make(server).download(IID, dl)
    assert server.ranges_seen == []
    assert list(dl.iterdir()) == []
    assert not dl.with_name("dl.part").exists()


def test_missing_parent_fails_before_any_byte(dl: Path) -> None:
    server = FlakyFile(cut=len(DATA) + 1)
    with pytest.raises(LocalIOError, match="no/such"):
        make(server).download(IID, dl / "no" / "such" / "img")
    assert server.ranges_seen == []


def test_check_destination_accepts_new_and_regular_files(dl: Path) -> None:
    check_destination(dl / "new")
    (dl / "old").write_bytes(b"x")
    check_destination(dl / "old")
    with pytest.raises(UsageError):
        check_destination(dl / "..")


def test_size_mismatch_leaves_no_part_file(dl: Path) -> None:
    server = FlakyFile(cut=len(DATA) + 1, data=DATA[:-1])
    with pytest.raises(IntegrityError, match="offers"):
        make(server).download(IID, dl / "img")
    assert list(dl.iterdir()) == []


def test_failure_before_any_byte_leaves_no_part_file(dl: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/file"):
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json=record())

    with pytest.raises(BackendUnavailableError):
        make(handler).download(IID, dl / "img")
    assert list(dl.iterdir()) == []


def test_connection_failure_keeps_the_bytes_for_resuming(dl: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if not request.url.path.endswith("/file"):
            return httpx.Response(200, json=record())
        calls += 1
        if calls > 1:
            return httpx.Response(503, text="busy")

        def stream():  # type: ignore[no-untyped-def]
            yield DATA[:65536]
            raise httpx.ReadError("connection dropped")

        return httpx.Response(200, headers={"Content-Length": str(len(DATA))}, content=stream())

    with pytest.raises(BackendUnavailableError):
        make(handler).download(IID, dl / "img")
    assert (dl / "img.part").read_bytes() == DATA[:65536]
    make(FlakyFile(cut=len(DATA) + 1)).download(IID, dl / "img")
    assert (dl / "img").read_bytes() == DATA
