"""The fetch engine with an in-memory source and a real ``.part`` sink (what the
removed ``cache/sink.py`` and ``cache/fetch.py`` tests asserted, now on the engine)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cowfleet import safeopen
from cowfleet.digest import verifier_for
from cowfleet.errors import BackendUnavailableError, IntegrityError, LocalIOError
from cowfleet.fetch.buffers import BufferPool
from cowfleet.fetch.engine import Fetched, Want, fetch
from cowfleet.fetch.partsink import BLOCK, PartSink
from cowfleet.fetch.retry import DeadlinePassed, RetryPolicy
from cowfleet.formats.inspector import Inspector

ID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"
MiB = 1024 * 1024


@dataclass
class Stream:
    status: int
    offset: int
    total_size: int | None
    body: Iterator[bytes]

    def iter_chunks(self, chunk_size: int = MiB) -> Iterator[bytes]:
        return self.body


@dataclass
class Source:
    """Serves ``data``; attempt ``i`` drops after ``cut[i]`` bytes; records offsets."""

    data: bytes
    cut: list[int | None] = field(default_factory=list)
    ignore_range: bool = False
    piece: int = 300_000
    total: int | None = None  # the size the answer claims (default: len(data))
    short: int | None = None  # every body ends (cleanly) at this byte
    asked: list[int] = field(default_factory=list)

    @contextlib.contextmanager
    def __call__(self, offset: int, pool: BufferPool) -> Iterator[Stream]:
        attempt = len(self.asked)
        self.asked.append(offset)
        cut = self.cut[attempt] if attempt < len(self.cut) else None
        start = 0 if self.ignore_range else offset
        status = 200 if self.ignore_range or not offset else 206
        total = len(self.data) if self.total is None else self.total
        yield Stream(status, start, total, self._body(self.data[start : self.short], cut))

    def _body(self, rest: bytes, cut: int | None) -> Iterator[bytes]:
        sent = 0
        for i in range(0, len(rest), self.piece):
            piece = rest[i : i + self.piece]
            if cut is not None and sent + len(piece) > cut:
                if cut > sent:
                    yield piece[: cut - sent]
                raise BackendUnavailableError("connection dropped (fake)")
            sent += len(piece)
            yield piece


def _sink(tmp_path: Path, *, inspect: bool = True) -> PartSink:
    with safeopen.opened_dir(tmp_path) as dfd:
        try:
            fd = safeopen.open_existing(dfd, "x.part", display="x.part", flags=os.O_RDWR)
        except FileNotFoundError:
            fd = safeopen.create(dfd, "x.part", display="x.part")
    return PartSink(fd, str(tmp_path / "x.part"), inspector_factory=Inspector if inspect else None)


def _want(data: bytes, digest: str | None = None) -> Want:
    value = digest or hashlib.sha512(data).hexdigest()
    return Want(ID, len(data), verifier_for(ID, ("sha512", value)))


def _run(
    tmp_path: Path, source: Source, want: Want, *, retries: int = 5, deadline: float = 60
) -> Fetched:
    sink = _sink(tmp_path)
    budget = RetryPolicy(retries=retries, deadline=deadline).start(sleep=lambda s: None)
    try:
        return fetch(source, sink, want, budget)
    finally:
        sink.close()


def test_every_byte_lands_in_order_and_zero_blocks_become_holes(tmp_path: Path) -> None:
    data = b"\x01" * BLOCK + bytes(8 * MiB) + b"\x02" * 100 + bytes(3 * BLOCK)
    done = _run(tmp_path, Source(data, piece=65_537), _want(data))
    assert done.inspection is not None and done.inspection.format == "raw"
    path = tmp_path / "x.part"
    assert path.read_bytes() == data
    assert path.stat().st_blocks * 512 < MiB  # the 8 MiB of zeros are not allocated


def test_more_bytes_than_declared_is_refused(tmp_path: Path) -> None:
    data = os.urandom(1000)
    with pytest.raises(IntegrityError, match="more than the declared"):
        _run(tmp_path, Source(data + b"x", total=1000), _want(data))
    with pytest.raises(IntegrityError, match="offers 1001 bytes"):
        _run(tmp_path, Source(data + b"x"), _want(data))


def test_digest_mismatch(tmp_path: Path) -> None:
    data = os.urandom(5000)
    with pytest.raises(IntegrityError, match="sha512 mismatch"):
        _run(tmp_path, Source(data), _want(data, "00" * 64))


def test_a_body_that_stays_short_is_a_truncated_download(tmp_path: Path) -> None:
    data = os.urandom(5000)
    with pytest.raises(IntegrityError, match="truncated"):
        _run(tmp_path, Source(data, short=4000), _want(data), retries=2)


def test_a_dropped_connection_resumes_with_range(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    source = Source(data, cut=[MiB + 5, 2 * MiB])
    done = _run(tmp_path, source, _want(data))
    assert source.asked == [0, MiB + 5, 3 * MiB + 5]
    assert done.attempts == 3 and done.restarts == 0
    assert (tmp_path / "x.part").read_bytes() == data


def test_an_ignored_range_starts_over(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    done = _run(tmp_path, Source(data, cut=[50_000], ignore_range=True, piece=10_000), _want(data))
    assert done.restarts == 1
    assert (tmp_path / "x.part").read_bytes() == data


def test_a_part_left_by_an_earlier_run_is_reverified_and_continued(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(1000)
    with pytest.raises(BackendUnavailableError):
        _run(tmp_path, Source(data, cut=[4 * MiB, 0]), _want(data), retries=0)
    kept = (tmp_path / "x.part").stat().st_size
    # the trailing zeros were never written (a hole past EOF): they are fetched again
    assert 3 * MiB <= kept <= 4 * MiB
    source = Source(data)
    done = _run(tmp_path, source, _want(data))
    assert source.asked == [kept] and done.resumed_from == kept
    assert done.inspection is not None and done.inspection.format == "raw"
    assert (tmp_path / "x.part").read_bytes() == data


def test_a_kept_part_that_does_not_verify_is_fetched_again_once(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    (tmp_path / "x.part").write_bytes(os.urandom(MiB))  # another image's bytes
    source = Source(data)
    done = _run(tmp_path, source, _want(data))
    assert source.asked == [MiB, 0] and done.restarts == 1
    assert (tmp_path / "x.part").read_bytes() == data


def test_a_stalled_source_hits_the_deadline(tmp_path: Path) -> None:
    data = os.urandom(1000)
    release = threading.Event()

    class Stalled(Source):
        def _body(self, rest: bytes, cut: int | None) -> Iterator[bytes]:
            yield rest[:10]
            release.wait(10)
            yield rest[10:]

    start = time.monotonic()
    with pytest.raises(DeadlinePassed):
        _run(tmp_path, Stalled(data), _want(data), deadline=0.3)
    assert time.monotonic() - start < 5
    release.set()


def test_pooled_buffers_all_come_back(tmp_path: Path) -> None:
    data = os.urandom(5 * MiB)
    pools: list[BufferPool] = []

    class Pooled(Source):
        @contextlib.contextmanager
        def __call__(self, offset: int, pool: BufferPool) -> Iterator[Stream]:
            pools.append(pool)

            def body() -> Iterator[bytes]:
                for i in range(offset, len(data), MiB):
                    buf = pool.take(timeout=5)
                    piece = data[i : i + MiB]
                    buf[: len(piece)] = piece
                    yield memoryview(buf)[: len(piece)]  # type: ignore[misc]

            yield Stream(200, 0, len(data), body())

    _run(tmp_path, Pooled(data), _want(data))
    assert (tmp_path / "x.part").read_bytes() == data
    assert len(pools[0]._free) == len(pools[0]._all)


def test_create_refuses_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "x.part")
    with pytest.raises(LocalIOError, match="symlink"):
        _sink(tmp_path)
    assert victim.read_text() == "keep"


class PieceCheck:
    """A verifier that checks each piece as it lands (as a hash tree does)."""

    name = "pieces"

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def update(self, chunk: bytes | memoryview) -> None:
        if bytes(chunk) != self.data[self.at : self.at + len(chunk)]:
            raise IntegrityError(f"bad piece at {self.at}")
        self.at += len(chunk)

    def verify(self) -> None:
        if self.at != len(self.data):
            raise IntegrityError("short")


def test_kept_bytes_a_piecewise_verifier_refuses_are_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    (tmp_path / "x.part").write_bytes(data[:1000] + os.urandom(MiB))
    source = Source(data)
    done = _run(tmp_path, source, Want(ID, len(data), lambda: PieceCheck(data)))
    assert source.asked == [0] and done.restarts == 1 and done.verified_with == "pieces"
    assert (tmp_path / "x.part").read_bytes() == data


def test_a_bad_piece_from_the_source_fails_the_fetch(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    bad = data[:500_000] + bytes([data[500_000] ^ 0xFF]) + data[500_001:]  # always differs
    with pytest.raises(IntegrityError, match="bad piece"):
        _run(tmp_path, Source(bad), Want(ID, len(data), lambda: PieceCheck(data)))
