from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cowfleet.cache.sink import BLOCK, PartFile, StreamSink
from cowfleet.errors import IntegrityError, LocalIOError
from cowfleet.formats.inspector import Inspector

ID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"


def _sink(tmp_path: Path, data: bytes, *, digest: str | None = None) -> StreamSink:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        part = PartFile.create(dfd, "x.part", str(tmp_path / "x.part"))
    finally:
        os.close(dfd)
    return StreamSink(
        part,
        image_id=ID,
        expected_size=len(data),
        hash_algo="sha512",
        hash_value=digest or hashlib.sha512(data).hexdigest(),
        inspector_factory=Inspector,
    )


def _feed(sink: StreamSink, data: bytes, chunk: int = 300_000) -> None:
    for i in range(0, len(data), chunk):
        sink.feed(data[i : i + chunk])


def test_zero_blocks_become_holes(tmp_path: Path) -> None:
    data = b"\x01" * BLOCK + bytes(8 * 1024 * 1024) + b"\x02" * 100 + bytes(3 * BLOCK)
    sink = _sink(tmp_path, data)
    _feed(sink, data)
    sink.finish()
    sink.close()
    sink.part.close()
    path = tmp_path / "x.part"
    assert path.read_bytes() == data
    st = path.stat()
    assert st.st_size == len(data)
    assert st.st_blocks * 512 < 1024 * 1024  # the 8 MiB of zeros are not allocated


def test_more_bytes_than_declared_is_refused(tmp_path: Path) -> None:
    data = os.urandom(1000)
    sink = _sink(tmp_path, data)
    sink.feed(data)
    with pytest.raises(IntegrityError, match="more than the declared"):
        sink.feed(b"x")


def test_digest_mismatch(tmp_path: Path) -> None:
    data = os.urandom(5000)
    sink = _sink(tmp_path, data, digest="00" * 64)
    sink.feed(data)
    with pytest.raises(IntegrityError, match="sha512 mismatch"):
        sink.finish()


def test_truncated(tmp_path: Path) -> None:
    data = os.urandom(5000)
    sink = _sink(tmp_path, data)
    sink.feed(data[:4000])
    with pytest.raises(IntegrityError, match="truncated"):
        sink.finish()


def test_create_refuses_existing_file_and_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "x.part")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(LocalIOError):
            PartFile.create(dfd, "x.part", "x.part")
        with pytest.raises(LocalIOError, match="symlink"):
            PartFile.reopen(dfd, "x.part", "x.part")
    finally:
        os.close(dfd)
    assert victim.read_text() == "keep"


def test_resume_rehashes_the_prefix(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024) + bytes(2 * 1024 * 1024) + os.urandom(1000)
    first = _sink(tmp_path, data)
    _feed(first, data[: 4 * 1024 * 1024])  # ends inside the zero run: trailing hole
    first.close()
    first.part.close()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        part = PartFile.reopen(dfd, "x.part", "x.part")
    finally:
        os.close(dfd)
    sink = StreamSink(
        part,
        image_id=ID,
        expected_size=len(data),
        hash_algo="sha512",
        hash_value=hashlib.sha512(data).hexdigest(),
        inspector_factory=Inspector,
    )
    kept = sink.absorb_prefix()
    # the trailing zeros were never written (a hole past EOF): they are fetched again
    assert 3 * 1024 * 1024 <= kept < 3 * 1024 * 1024 + 300_000
    _feed(sink, data[kept:])
    inspection = sink.finish()
    assert inspection.format == "raw"
    assert (tmp_path / "x.part").read_bytes() == data


def test_restart_after_ignored_range(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    sink = _sink(tmp_path, data)
    sink.feed(data[:50_000])
    sink.restart()
    _feed(sink, data)
    sink.finish()
    assert (tmp_path / "x.part").read_bytes() == data
