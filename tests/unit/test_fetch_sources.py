"""Sources: peers first, the origin last; only tree-checked leaves reach the sink; a bad
piece or a failing peer hands over at once, at the same (leaf) offset; live tracking."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cowfleet.cache.live import LiveFetches, TrackingSink
from cowfleet.digest import tree_and_digest
from cowfleet.errors import (
    BackendUnavailableError,
    IntegrityError,
    NotFoundError,
    TimeoutError_,
    ValidationError,
)
from cowfleet.fetch.buffers import BufferPool
from cowfleet.fetch.engine import Want, fetch
from cowfleet.fetch.partsink import PartSink
from cowfleet.fetch.retry import RetryPolicy
from cowfleet.fetch.sources import Peer, Sources, parse_sources
from cowfleet.hashtree import MIN_LEAF_SIZE, tree_of

ID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"
LEAF = MIN_LEAF_SIZE  # 64 KiB leaves keep the test small


@dataclass
class Stream:
    status: int
    offset: int
    total_size: int | None
    body: Iterator[bytes]

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self.body


@dataclass
class Fake:
    """A source serving ``data`` (``corrupt``: flip a byte there; ``die_at``: the body
    breaks at that byte; ``missing``: 404)."""

    name: str
    data: bytes
    peer: bool = True
    corrupt: int | None = None
    die_at: int | None = None
    missing: bool = False
    asked: list[int] = field(default_factory=list)

    def open(self, offset: int, pool: BufferPool) -> contextlib.AbstractContextManager[Stream]:
        return self._open(offset)

    @contextlib.contextmanager
    def _open(self, offset: int) -> Iterator[Stream]:
        self.asked.append(offset)
        if self.missing:
            raise NotFoundError(f"{self.name}: 404")
        data = bytearray(self.data)
        if self.corrupt is not None:
            data[self.corrupt] ^= 0xFF
        yield Stream(206 if offset else 200, offset, len(data), self._body(bytes(data), offset))

    def _body(self, data: bytes, offset: int) -> Iterator[bytes]:
        pos = offset
        while pos < len(data):
            end = min(pos + 10_000, len(data))
            if self.die_at is not None and end > self.die_at:
                if self.die_at > pos:
                    yield data[pos : self.die_at]
                raise BackendUnavailableError(f"{self.name}: connection reset")
            yield data[pos:end]
            pos = end


DATA = os.urandom(5 * LEAF + 1234)
TREE = tree_of(DATA, LEAF)


def _fetch(tmp_path: Path, sources: list[Fake], **kw: object) -> tuple[bytes, Sources]:
    fd = os.open(tmp_path / "x.part", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    sink = PartSink(fd, "x.part")
    digest = ("sha512", hashlib.sha512(DATA).hexdigest())
    want = Want(ID, len(DATA), tree_and_digest(ID, digest, TREE))
    src = Sources(sources, TREE, ID, **kw)  # type: ignore[arg-type]
    budget = RetryPolicy(retries=2).start(sleep=lambda s: pytest.fail("no backoff on a switch"))
    try:
        done = fetch(src, sink, want, budget)
        assert done.verified_with == "sha256 tree + sha512"
    finally:
        sink.close()
    return (tmp_path / "x.part").read_bytes(), src


def test_a_good_peer_serves_everything_and_the_origin_is_not_asked(tmp_path: Path) -> None:
    peer, origin = Fake("a", DATA), Fake("origin", DATA, peer=False)
    got, _ = _fetch(tmp_path, [peer, origin])
    assert got == DATA and peer.asked == [0] and origin.asked == []


def test_a_bad_piece_is_caught_reported_and_refetched_from_the_next_source(
    tmp_path: Path,
) -> None:
    bad = 2 * LEAF + 77  # in leaf 2
    rogue, good, origin = Fake("rogue", DATA, corrupt=bad), Fake("b", DATA), Fake("o", DATA, False)
    reports: list[tuple[str, str]] = []
    got, src = _fetch(
        tmp_path, [rogue, good, origin], on_corrupt=lambda h, r: reports.append((h, r))
    )
    assert got == DATA
    assert good.asked == [2 * LEAF]  # the leaves before the bad one were kept
    assert origin.asked == []
    assert [h for h, _ in reports] == ["rogue"] and "leaf 2" in reports[0][1]
    assert src.failed[0][0] == "rogue"


def test_a_peer_dying_mid_leaf_hands_over_at_the_leaf_start(tmp_path: Path) -> None:
    dying, origin = Fake("a", DATA, die_at=3 * LEAF + 500), Fake("o", DATA, peer=False)
    got, src = _fetch(tmp_path, [dying, origin])
    assert got == DATA and origin.asked == [3 * LEAF] and src.used == ["a", "o"]


def test_bytes_are_counted_per_source_and_each_switch_is_announced(tmp_path: Path) -> None:
    dying, origin = Fake("a", DATA, die_at=3 * LEAF + 500), Fake("origin", DATA, peer=False)
    switches: list[str] = []
    got, src = _fetch(tmp_path, [dying, origin], on_switch=switches.append)
    assert got == DATA and switches == ["origin"]
    assert src.delivered == {"a": 3 * LEAF, "origin": len(DATA) - 3 * LEAF}
    assert src.main == "a" and src.is_peer("a") and not src.is_peer("origin")


def test_a_peer_without_the_image_is_skipped(tmp_path: Path) -> None:
    gone, origin = Fake("a", DATA, missing=True), Fake("o", DATA, peer=False)
    got, src = _fetch(tmp_path, [gone, origin])
    assert got == DATA and origin.asked == [0] and src.failed[0][0] == "a"


def test_the_origin_sending_a_bad_piece_fails_the_fetch(tmp_path: Path) -> None:
    origin = Fake("o", DATA, peer=False, corrupt=LEAF)
    with pytest.raises(IntegrityError, match="leaf 1"):
        _fetch(tmp_path, [Fake("a", DATA, missing=True), origin])


def test_tracking_sink_lets_a_reader_stream_what_has_landed(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "y.part", os.O_RDWR | os.O_CREAT, 0o600)
    live = LiveFetches()
    entry = live.begin(ID, 3 * LEAF, fd)
    sink = TrackingSink(PartSink(fd, "y.part"), entry)
    entry.open_reader()
    got: list[bytes] = []

    def reader() -> None:
        pos = 0
        while pos < 3 * LEAF:
            data = entry.read(pos, LEAF, timeout=5)
            got.append(data)
            pos += len(data)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(3):
        sink.write(i * LEAF, DATA[i * LEAF : (i + 1) * LEAF])
    t.join(5)
    assert b"".join(got) == DATA[: 3 * LEAF]
    with pytest.raises(TimeoutError_):
        entry.read(3 * LEAF, 1, timeout=0.05)  # past what landed
    live.end(entry, False)
    with pytest.raises(BackendUnavailableError):
        entry.read(0, 1, timeout=0.05)
    entry.close_reader()
    assert live.get(ID) is None
    os.close(fd)


def test_parse_sources_refuses_bad_entries() -> None:
    assert parse_sources(None) == ()
    assert parse_sources([{"host": "n1", "url": "http://127.0.0.2:8775/"}]) == (
        Peer("n1", "http://127.0.0.2:8775"),
    )
    for bad in (
        "x",
        [{"host": "n1"}],
        [{"host": "../x", "url": "http://a"}],
        [{"host": "n1", "url": "file:///etc"}],
        [{"host": "n1", "url": "http://a/path"}],
        [{"host": "n1", "url": "http://a"}, {"host": "n1", "url": "http://b"}],
        [{"host": f"n{i}", "url": "http://a"} for i in range(17)],
    ):
        with pytest.raises(ValidationError):
            parse_sources(bad)


def test_peering_leaves_out_this_node_and_peers_caught_for_this_image() -> None:
    from cowfleet.cache.peering import Peering
    from cowfleet.fetch.sources import OriginSource

    peering = Peering("tok", host="me")
    peering.corrupt(ID)("bad", "leaf 1")
    peers = [Peer(h, f"http://{h}:1") for h in ("me", "bad", "good")]
    names = [s.name for s in peering.sources(ID, peers, OriginSource(lambda o, p: None))]  # type: ignore[arg-type,return-value]
    assert names == ["good", "origin"]
    other = "0f1c2b0e-8d7a-4c3e-9f10-0123456789ab"
    names = [s.name for s in peering.sources(other, peers, OriginSource(lambda o, p: None))]  # type: ignore[arg-type,return-value]
    assert names == ["bad", "good", "origin"]
    peering.close()
