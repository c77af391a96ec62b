"""StripedSources: each stripe from its own chain, checked leaves handed on in order, a
failing or lying stripe source replaced at the same leaf, memory bounded."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cowfleet.digest import tree_and_digest
from cowfleet.errors import BackendUnavailableError, IntegrityError, NotFoundError, ValidationError
from cowfleet.fetch.buffers import BufferPool
from cowfleet.fetch.engine import Want, fetch
from cowfleet.fetch.partsink import PartSink
from cowfleet.fetch.retry import RetryPolicy
from cowfleet.fetch.sources import Peer
from cowfleet.fetch.stripes import (
    QUEUE_LEAVES,
    OriginStripes,
    StripedSources,
    parse_stripes,
)
from cowfleet.hashtree import MIN_LEAF_SIZE, tree_of
from tests.unit import test_fetch_sources_hash_once as hash_once

ID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"
LEAF = MIN_LEAF_SIZE
DATA = os.urandom(9 * LEAF + 1234)  # 10 leaves, the last short
TREE = tree_of(DATA, LEAF)


@dataclass
class FakeStripes:
    """Serves any stripe of ``DATA`` (``corrupt``: a leaf whose bytes it flips;
    ``die_at``: the leaf in which its body breaks; ``missing``: 404; ``gate``: wait for
    it before the leaf after the first)."""

    name: str
    peer: bool = True
    corrupt: int | None = None
    die_at: int | None = None
    missing: bool = False
    gate: threading.Event | None = None
    asked: list[tuple[int, int, int]] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    def open(
        self, stripe: int, stripes: int, first: int
    ) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        return self._open(stripe, stripes, first)

    @contextlib.contextmanager
    def _open(self, stripe: int, stripes: int, first: int) -> Iterator[Iterator[bytes]]:
        self.asked.append((stripe, stripes, first))
        if self.missing:
            raise NotFoundError(f"{self.name}: 404")
        yield self._body(stripes, first)

    def _body(self, stripes: int, first: int) -> Iterator[bytes]:
        for i in range(first, TREE.count, stripes):
            if self.gate is not None and i > first:
                assert self.gate.wait(10)
            leaf = bytearray(DATA[i * LEAF : (i + 1) * LEAF])
            if i == self.corrupt:
                leaf[5] ^= 0xFF
            if i == self.die_at:
                yield bytes(leaf[:100])
                raise BackendUnavailableError(f"{self.name}: connection reset")
            self.sent.append(i)
            yield bytes(leaf[: len(leaf) // 2])
            yield bytes(leaf[len(leaf) // 2 :])


def _fetch(tmp_path: Path, chains: list[list[FakeStripes]], **kw: object) -> StripedSources:
    fd = os.open(tmp_path / "x.part", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    sink = PartSink(fd, "x.part")
    digest = ("sha512", hashlib.sha512(DATA).hexdigest())
    src = StripedSources(chains, TREE, ID, **kw)  # type: ignore[arg-type]
    want = Want(ID, len(DATA), tree_and_digest(ID, digest, TREE, checked_by=src.checker))
    budget = RetryPolicy(retries=1).start(sleep=lambda s: None)
    try:
        fetch(src, sink, want, budget)
    finally:
        sink.close()
    assert (tmp_path / "x.part").read_bytes() == DATA
    return src


def test_each_stripe_comes_from_its_own_peer_and_lands_in_order(tmp_path: Path) -> None:
    a, b, origin = FakeStripes("a"), FakeStripes("b"), FakeStripes("origin", peer=False)
    src = _fetch(tmp_path, [[a, origin], [b, origin]])
    assert a.asked == [(0, 2, 0)] and b.asked == [(1, 2, 1)] and origin.asked == []
    assert a.sent == [0, 2, 4, 6, 8] and b.sent == [1, 3, 5, 7, 9]
    assert src.delivered == {"a": 5 * LEAF, "b": 4 * LEAF + 1234}


def test_a_lying_stripe_source_is_reported_and_its_stripe_goes_on_at_the_same_leaf(
    tmp_path: Path,
) -> None:
    rogue, good, a = FakeStripes("rogue", corrupt=5), FakeStripes("good"), FakeStripes("a")
    origin = FakeStripes("origin", peer=False)
    reports: list[tuple[str, str]] = []
    switches: list[str] = []
    src = _fetch(
        tmp_path,
        [[a, origin], [rogue, good, origin]],
        on_corrupt=lambda h, r: reports.append((h, r)),
        on_switch=switches.append,
    )
    assert [h for h, _ in reports] == ["rogue"] and "leaf 5" in reports[0][1]
    assert good.asked == [(1, 2, 5)] and origin.asked == []  # leaves 1 and 3 were kept
    assert switches == ["good"] and src.failed[0][0] == "rogue"


def test_a_dying_or_missing_stripe_source_hands_over_down_to_the_origin(tmp_path: Path) -> None:
    dying, gone = FakeStripes("dying", die_at=4), FakeStripes("gone", missing=True)
    b, origin = FakeStripes("b"), FakeStripes("origin", peer=False)
    src = _fetch(tmp_path, [[dying, gone, origin], [b, origin]])
    assert gone.asked == [(0, 2, 4)] and origin.asked == [(0, 2, 4)]
    assert [name for name, _ in src.failed] == ["dying", "gone"]
    assert src.delivered["origin"] == 3 * LEAF and src.delivered["dying"] == 2 * LEAF


def test_the_origin_sending_a_bad_leaf_fails_the_fetch(tmp_path: Path) -> None:
    origin = FakeStripes("origin", peer=False, corrupt=3)
    with pytest.raises(IntegrityError, match="leaf 3"):
        _fetch(tmp_path, [[FakeStripes("a"), origin], [origin]])


def test_a_stripe_ahead_of_the_others_waits_with_a_bounded_queue() -> None:
    gate = threading.Event()
    fast, slow = FakeStripes("fast"), FakeStripes("slow", gate=gate)
    src = StripedSources([[fast], [slow]], TREE, ID)
    got: list[int] = []
    with src(0, BufferPool(1, 1)) as stream:
        chunks = stream.iter_chunks()
        got.append(len(next(chunks)))  # leaf 0
        got.append(len(next(chunks)))  # leaf 1 (slow's first)
        threading.Event().wait(0.5)  # slow is stuck before leaf 3: fast fills its queue
        assert len(fast.sent) <= QUEUE_LEAVES + 2  # queued, plus one it is handing on
        gate.set()
        got.extend(len(c) for c in chunks)
    assert sum(got) == len(DATA) and fast.sent == [0, 2, 4, 6, 8]


def test_a_resumed_fetch_starts_each_stripe_at_its_first_leaf_after_the_offset() -> None:
    a, b = FakeStripes("a"), FakeStripes("b")
    src = StripedSources([[a], [b]], TREE, ID)
    with src(3 * LEAF + 10, BufferPool(1, 1)) as stream:
        assert stream.status == 206 and stream.offset == 3 * LEAF + 10
        body = b"".join(bytes(c) for c in stream.iter_chunks())
    assert body == DATA[3 * LEAF + 10 :]
    assert a.asked == [(0, 2, 4)] and b.asked == [(1, 2, 3)]


@dataclass
class _Range:
    status: int
    offset: int
    total_size: int | None
    data: bytes

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        yield self.data


def test_the_origin_is_asked_one_bounded_range_per_leaf_of_its_stripe() -> None:
    asked: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def open_range(first: int, last: int) -> Iterator[_Range]:
        asked.append((first, last))
        yield _Range(206, first, len(DATA), DATA[first : last + 1])

    origin = OriginStripes(open_range, TREE)
    with origin.open(1, 3, 4) as body:
        got = b"".join(body)
    assert asked == [(4 * LEAF, 5 * LEAF - 1), (7 * LEAF, 8 * LEAF - 1)]
    assert got == DATA[4 * LEAF : 5 * LEAF] + DATA[7 * LEAF : 8 * LEAF]


def test_parse_stripes_refuses_bad_input_naming_the_problem() -> None:
    ok = [[{"host": "a", "url": "http://127.0.0.2:8775"}], []]
    assert parse_stripes(None) == ()
    assert parse_stripes(ok) == ((Peer("a", "http://127.0.0.2:8775"),), ())
    for bad, words in (
        ("x", "2 to 8 lists"),
        ([[]], "2 to 8 lists"),
        ([[]] * 9, "2 to 8 lists"),
        ([[], "x"], r"stripes\[1\]"),
        ([[], [{"host": "../x", "url": "http://a"}]], r"stripes\[1\]: source host"),
        ([[{"host": f"n{i}", "url": "http://a"} for i in range(17)], []], "at most 16"),
    ):
        with pytest.raises(ValidationError, match=words):
            parse_stripes(bad)


counted = hash_once.counted  # the fixture that counts what the hash tree module hashes


def test_a_striped_fetch_hashes_each_leaf_once(tmp_path: Path, counted: hash_once.Counter) -> None:
    """The stripes' readers check every leaf; the engine's tree check follows them and
    does not hash those leaves a second time (it did before the fetch passed
    ``checked_by``)."""
    a, b, origin = FakeStripes("a"), FakeStripes("b"), FakeStripes("origin", peer=False)
    _fetch(tmp_path, [[a, origin], [b, origin]])
    assert len(DATA) <= counted.hashed <= len(DATA) + hash_once.OVERHEAD
