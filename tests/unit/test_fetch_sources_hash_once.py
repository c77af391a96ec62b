"""A peer fetch hashes each leaf once: the engine's tree check follows the Sources checker.

The sha256 the hash tree module uses is replaced by one that counts the bytes it is fed,
so these tests see how many times the fetch hashed the image.
"""

from __future__ import annotations

import hashlib
import os
import types
from pathlib import Path
from typing import Any

import pytest

from cowfleet import hashtree
from cowfleet.digest import TreeCheck, tree_and_digest
from cowfleet.errors import IntegrityError, UsageError
from cowfleet.fetch.engine import Want, fetch
from cowfleet.fetch.partsink import PartSink
from cowfleet.fetch.retry import RetryPolicy
from cowfleet.fetch.sources import Sources
from cowfleet.hashtree import MIN_LEAF_SIZE, TreeVerifier, tree_of
from tests.unit.test_fetch_sources import DATA, ID, LEAF, TREE, Fake


class Counter:
    def __init__(self) -> None:
        self.hashed = 0  # bytes fed to sha256 by the hash tree module


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counter = Counter()

    class Sha256:
        def __init__(self, data: Any = b"") -> None:
            self._h = hashlib.sha256()
            self.update(data)

        def update(self, data: Any) -> None:
            counter.hashed += memoryview(data).nbytes
            self._h.update(data)

        def digest(self) -> bytes:
            return self._h.digest()

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(hashtree, "hashlib", types.SimpleNamespace(sha256=Sha256))
    return counter


# Leaf lists hashed to their root when a verifier is made: a few hundred bytes each.
OVERHEAD = 4096


def _fetch(tmp_path: Path, sources: list[Fake], **kw: Any) -> tuple[bytes, Sources]:
    fd = os.open(tmp_path / "x.part", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    sink = PartSink(fd, "x.part")
    src = Sources(sources, TREE, ID, **kw)  # type: ignore[arg-type]
    digest = ("sha512", hashlib.sha512(DATA).hexdigest())
    want = Want(ID, len(DATA), tree_and_digest(ID, digest, TREE, checked_by=src.checker))
    budget = RetryPolicy(retries=2).start(sleep=lambda s: pytest.fail("no backoff on a switch"))
    try:
        done = fetch(src, sink, want, budget)
        assert done.verified_with == "sha256 tree + sha512"
    finally:
        sink.close()
    return (tmp_path / "x.part").read_bytes(), src


def test_a_peer_fetch_hashes_each_leaf_once(tmp_path: Path, counted: Counter) -> None:
    peer, origin = Fake("a", DATA), Fake("origin", DATA, peer=False)
    got, _ = _fetch(tmp_path, [peer, origin])
    assert got == DATA
    assert len(DATA) <= counted.hashed <= len(DATA) + OVERHEAD  # was twice the image


def test_a_corrupt_leaf_is_still_caught_and_the_next_source_takes_over(
    tmp_path: Path, counted: Counter
) -> None:
    rogue = Fake("rogue", DATA, corrupt=3 * LEAF + 5)
    good, origin = Fake("b", DATA), Fake("o", DATA, peer=False)
    reports: list[str] = []
    got, src = _fetch(
        tmp_path, [rogue, good, origin], on_corrupt=lambda host, _why: reports.append(host)
    )
    assert got == DATA
    assert reports == ["rogue"] and good.asked == [3 * LEAF] and origin.asked == []
    assert src.delivered == {"rogue": 3 * LEAF, "b": len(DATA) - 3 * LEAF}
    # Every leaf once, and the bad copy of leaf 3 (refused by the checker).
    assert counted.hashed <= len(DATA) + LEAF + OVERHEAD


def test_a_fetch_restarted_at_a_leaf_boundary_still_hashes_once(
    tmp_path: Path, counted: Counter
) -> None:
    dying, origin = Fake("a", DATA, die_at=2 * LEAF + 100), Fake("o", DATA, peer=False)
    got, src = _fetch(tmp_path, [dying, origin])
    assert got == DATA and origin.asked == [2 * LEAF] and src.used == ["a", "o"]
    assert counted.hashed <= len(DATA) + OVERHEAD


# -- the follower itself --------------------------------------------------------------
SMALL = os.urandom(3 * MIN_LEAF_SIZE + 10)
SMALL_TREE = tree_of(SMALL, MIN_LEAF_SIZE)


def _leaves() -> list[bytearray]:
    return [bytearray(SMALL[i : i + MIN_LEAF_SIZE]) for i in range(0, len(SMALL), MIN_LEAF_SIZE)]


def test_the_follower_takes_the_buffers_the_checker_passed(counted: Counter) -> None:
    checker = TreeVerifier.from_tree(SMALL_TREE)
    follower = checker.follower()
    leaves = _leaves()
    before = counted.hashed
    for i, leaf in enumerate(leaves):
        checker.check_leaf(i, leaf)
        follower.update(memoryview(leaf))
    follower.finish()
    assert counted.hashed - before == len(SMALL)  # the checker's hashes only
    assert follower.verified == len(SMALL)


def test_the_follower_hashes_a_copy_and_refuses_a_changed_one() -> None:
    checker = TreeVerifier.from_tree(SMALL_TREE)
    follower = checker.follower()
    leaves = _leaves()
    checker.check_leaf(0, leaves[0])
    other = bytearray(leaves[0])
    other[10] ^= 1  # equal length, not the buffer that passed: hashed, and refused
    with pytest.raises(IntegrityError, match="leaf 0"):
        follower.update(other)


def test_a_buffer_passed_for_one_leaf_is_hashed_at_another_place() -> None:
    checker = TreeVerifier.from_tree(SMALL_TREE)
    follower = checker.follower()
    leaves = _leaves()
    checker.check_leaf(1, leaves[1])
    with pytest.raises(IntegrityError, match="leaf 0"):
        follower.update(leaves[1])  # leaf 1's bytes where leaf 0 belongs


def test_a_buffer_the_checker_refused_is_hashed_by_the_follower() -> None:
    checker = TreeVerifier.from_tree(SMALL_TREE)
    follower = checker.follower()
    bad = _leaves()[0]
    bad[0] ^= 1
    with pytest.raises(IntegrityError):
        checker.check_leaf(0, bad)
    with pytest.raises(IntegrityError, match="leaf 0"):
        follower.update(bad)


def test_the_follower_refuses_a_short_stream_and_part_of_a_passed_leaf() -> None:
    checker = TreeVerifier.from_tree(SMALL_TREE)
    follower = checker.follower()
    leaves = _leaves()
    checker.check_leaf(0, leaves[0])
    checker.check_leaf(1, leaves[1])
    follower.update(leaves[0])
    follower.update(memoryview(leaves[1])[:100])  # a part: hashed as usual
    with pytest.raises(IntegrityError, match="ends at byte"):
        follower.finish()


def test_tree_check_refuses_a_checker_of_another_tree() -> None:
    checker = TreeVerifier.from_tree(tree_of(b"x" * 100, MIN_LEAF_SIZE))
    with pytest.raises(UsageError, match="another hash tree"):
        TreeCheck(SMALL_TREE, image_id=ID, checked_by=checker)
