from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfleet.cache.fetch import DeadlinePassed, pump
from cowfleet.cache.sink import PartFile, StreamSink
from cowfleet.errors import BackendUnavailableError
from cowfleet.formats.inspector import Inspector


def _sink(tmp_path: Path, data: bytes) -> StreamSink:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        part = PartFile.create(dfd, "x.part", "x.part")
    finally:
        os.close(dfd)
    return StreamSink(
        part,
        image_id="i",
        expected_size=len(data),
        hash_algo="sha512",
        hash_value=hashlib.sha512(data).hexdigest(),
        inspector_factory=Inspector,
    )


def test_pump_moves_every_byte_in_order(tmp_path: Path) -> None:
    data = os.urandom(3_000_001)
    sink = _sink(tmp_path, data)
    pump(
        iter([data[i : i + 65_537] for i in range(0, len(data), 65_537)]),
        sink,
        deadline=time.monotonic() + 30,
        depth=2,
    )
    sink.finish()
    sink.close()
    assert (tmp_path / "x.part").read_bytes() == data


def test_a_stalled_reader_hits_the_deadline(tmp_path: Path) -> None:
    data = os.urandom(1000)
    release = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield data[:10]
        release.wait(10)
        yield data[10:]

    sink = _sink(tmp_path, data)
    start = time.monotonic()
    with pytest.raises(DeadlinePassed):
        pump(stalled(), sink, deadline=time.monotonic() + 0.3)
    assert time.monotonic() - start < 5
    release.set()
    sink.close()


def test_reader_errors_reach_the_caller(tmp_path: Path) -> None:
    def broken() -> Iterator[bytes]:
        yield b"abc"
        raise BackendUnavailableError("peer closed the connection")

    sink = _sink(tmp_path, b"abcdef")
    with pytest.raises(BackendUnavailableError, match="peer closed"):
        pump(broken(), sink, deadline=time.monotonic() + 10)
    sink.close()
    assert sink.offset == 3
