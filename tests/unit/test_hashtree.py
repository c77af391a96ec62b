"""The sha256 hash tree: format, builder over any chunking, verifier's refusals."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowfleet.errors import IntegrityError, UsageError
from cowfleet.hashtree import (
    DEFAULT_LEAF_SIZE,
    MIN_LEAF_SIZE,
    PREFIX,
    Tree,
    TreeBuilder,
    TreeVerifier,
    check_leaf_size,
    tree_of,
)

LEAF = MIN_LEAF_SIZE
LEAVES = [LEAF, 2 * LEAF]


# Images of 0 to a little over 4 leaves of the smallest size: every edge (empty, one
# short leaf, exact multiples, a short last leaf) is in reach.
def _pattern(n: int) -> bytes:
    # Large inputs: deterministic bytes that still differ per offset (cheap to draw).
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


_BIG = _pattern(5 * LEAF)
datas = st.integers(0, 4 * LEAF + 3).flatmap(
    lambda n: st.binary(min_size=n, max_size=n) if n < 256 else st.just(_BIG[:n])
)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({min(p, len(data)) for p in points})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_format_is_as_documented() -> None:
    data = b"x" * (LEAF + 10)
    tree = tree_of(data, LEAF)
    d0 = hashlib.sha256(data[:LEAF]).digest()
    d1 = hashlib.sha256(data[LEAF:]).digest()
    assert tree.leaves == d0 + d1
    assert PREFIX == b"cowfleet sha256 tree v1\x00" and len(PREFIX) == 24  # as documented
    head = PREFIX + LEAF.to_bytes(8, "big") + (LEAF + 10).to_bytes(8, "big")
    assert tree.root == hashlib.sha256(head + d0 + d1).hexdigest()
    assert (tree.length, tree.leaf_size, tree.count) == (LEAF + 10, LEAF, 2)
    assert tree.span(1) == (LEAF, 10)


def test_empty_image_has_no_leaves() -> None:
    tree = tree_of(b"", LEAF)
    assert tree.leaves == b"" and tree.count == 0
    head = PREFIX + LEAF.to_bytes(8, "big") + bytes(8)
    assert tree.root == hashlib.sha256(head).hexdigest()
    v = TreeVerifier.from_tree(tree)
    v.update(b"")
    v.finish()


def test_leaf_size_and_length_are_bound_into_the_root() -> None:
    data = b"a" * (2 * LEAF)
    assert tree_of(data, LEAF).root != tree_of(data, 2 * LEAF).root
    # Same leaf list, another length claimed: a different root.
    t = tree_of(b"a" * 100, LEAF)
    with pytest.raises(IntegrityError, match="does not match its root"):
        TreeVerifier(t.root, LEAF, 99, t.leaves)


@pytest.mark.parametrize("bad", [0, 4096, MIN_LEAF_SIZE - 1, 3 * MIN_LEAF_SIZE, 2**31, True])
def test_leaf_size_must_be_a_power_of_two_of_64k_or_more(bad: int) -> None:
    with pytest.raises(UsageError, match="power of two"):
        check_leaf_size(bad)
    with pytest.raises(UsageError):
        TreeBuilder(bad)


@settings(max_examples=60, deadline=None)
@given(
    data=datas, points=st.lists(st.integers(0, 5 * LEAF), max_size=12), leaf=st.sampled_from(LEAVES)
)
def test_any_chunking_builds_the_same_tree(data: bytes, points: list[int], leaf: int) -> None:
    whole = tree_of(data, leaf)
    builder = TreeBuilder(leaf)
    for i, piece in enumerate(_cuts(data, points)):
        # bytes, bytearray and memoryview pieces alike
        builder.update([bytes, bytearray, memoryview][i % 3](piece))
    assert builder.finish() == whole
    assert whole.count == -(-len(data) // leaf)


@settings(max_examples=60, deadline=None)
@given(
    data=datas, points=st.lists(st.integers(0, 5 * LEAF), max_size=8), leaf=st.sampled_from(LEAVES)
)
def test_verifier_accepts_what_the_builder_made(data: bytes, points: list[int], leaf: int) -> None:
    tree = tree_of(data, leaf)
    v = TreeVerifier(tree.root.upper(), tree.leaf_size, tree.length, tree.leaves, image_id="i")
    for piece in _cuts(data, points):
        v.update(memoryview(piece))
    v.finish()
    assert v.verified == len(data)
    for i in range(tree.count):
        off, size = tree.span(i)
        v.check_leaf(i, data[off : off + size])


@settings(max_examples=60, deadline=None)
@given(data=datas.filter(bool), where=st.integers(0), bit=st.integers(0, 7))
def test_verifier_rejects_any_flipped_byte(data: bytes, where: int, bit: int) -> None:
    tree = tree_of(data, LEAF)
    pos = where % len(data)
    bad = bytearray(data)
    bad[pos] ^= 1 << bit
    index = pos // LEAF
    v = TreeVerifier.from_tree(tree, image_id="img-1")
    with pytest.raises(IntegrityError) as err:
        v.update(bad)
        v.finish()
    assert err.value.context["leaf"] == index
    assert err.value.context["offset"] == index * LEAF
    assert f"leaf {index} at byte offset {index * LEAF}" in str(err.value)
    assert "img-1" in str(err.value)
    off, size = tree.span(index)
    with pytest.raises(IntegrityError, match=f"leaf {index}"):
        v.check_leaf(index, bad[off : off + size])


@settings(max_examples=40, deadline=None)
@given(data=datas.filter(bool), cut=st.integers(1))
def test_verifier_rejects_truncation(data: bytes, cut: int) -> None:
    short = data[: len(data) - 1 - cut % len(data)]
    v = TreeVerifier.from_tree(tree_of(data, LEAF))
    v.update(short)
    with pytest.raises(IntegrityError, match=f"ends at byte {len(short)}"):
        v.finish()


@settings(max_examples=40, deadline=None)
@given(data=datas, extra=st.binary(min_size=1, max_size=64))
def test_verifier_rejects_extension(data: bytes, extra: bytes) -> None:
    v = TreeVerifier.from_tree(tree_of(data, LEAF))
    with pytest.raises(IntegrityError, match=f"more than the {len(data)} bytes"):
        v.update(data + extra)
    v2 = TreeVerifier.from_tree(tree_of(data, LEAF))
    v2.update(data)
    with pytest.raises(IntegrityError, match="more than"):
        v2.update(extra)


@settings(max_examples=60, deadline=None)
@given(
    data=datas.filter(lambda d: len(d) > 0),
    where=st.integers(0),
    change=st.sampled_from(["flip", "drop", "add", "swap"]),
)
def test_verifier_refuses_a_wrong_leaf_list(data: bytes, where: int, change: str) -> None:
    tree = tree_of(data, LEAF)
    leaves = bytearray(tree.leaves)
    if change == "flip":
        leaves[where % len(leaves)] ^= 0x01
    elif change == "drop":
        del leaves[-32:]
    elif change == "add":
        leaves += hashlib.sha256(b"more").digest()
    else:
        if tree.count < 2 or leaves[:32] == leaves[32:64]:
            leaves[0] ^= 0x80
        else:
            leaves[:64] = leaves[32:64] + leaves[:32]
    with pytest.raises(IntegrityError, match="image img-2"):
        TreeVerifier(tree.root, LEAF, len(data), leaves, image_id="img-2")


def test_wrong_root_is_refused_and_check_leaf_checks_sizes() -> None:
    data = _pattern(2 * LEAF + 5)
    tree = tree_of(data, LEAF)
    with pytest.raises(IntegrityError, match="does not match its root"):
        TreeVerifier("0" * 64, LEAF, len(data), tree.leaves)
    with pytest.raises(IntegrityError, match="64 lowercase hex"):
        TreeVerifier("xyz", LEAF, len(data), tree.leaves)
    v = TreeVerifier.from_tree(tree)
    with pytest.raises(IntegrityError, match="leaf 2 at byte offset 131072: 4 bytes where 5"):
        v.check_leaf(2, data[-4:])
    with pytest.raises(IndexError):
        v.check_leaf(3, b"")


def test_tree_shape_is_checked() -> None:
    with pytest.raises(IntegrityError, match="leaf list of 31 bytes"):
        Tree(LEAF, 1, b"x" * 31, "0" * 64)
    with pytest.raises(UsageError, match="non-negative"):
        Tree(LEAF, -1, b"", "0" * 64)


def test_builder_takes_read_only_memoryviews() -> None:
    data = memoryview(_pattern(3 * LEAF + 1)).toreadonly()
    builder = TreeBuilder(LEAF)
    builder.update(data)
    assert builder.finish() == tree_of(bytes(data), LEAF)


@settings(max_examples=40, deadline=None)
@given(data=datas, at=st.integers(0), flip=st.booleans())
def test_resume_at_a_leaf_boundary_checks_only_what_follows(
    data: bytes, at: int, flip: bool
) -> None:
    tree = tree_of(data, LEAF)
    offset = min((at % (tree.count + 1)) * LEAF, len(data))
    v = TreeVerifier.from_tree(tree)
    v.resume_at(offset)
    rest = bytearray(data[offset:])
    if flip and rest:
        rest[-1] ^= 0xFF
        with pytest.raises(IntegrityError, match=f"leaf {tree.count - 1} "):
            v.update(rest)
            v.finish()
    else:
        v.update(rest)
        v.finish()
        assert v.verified == len(data)


def test_resume_at_refuses_offsets_inside_a_leaf_or_after_the_start() -> None:
    tree = tree_of(_pattern(2 * LEAF + 9), LEAF)
    v = TreeVerifier.from_tree(tree)
    with pytest.raises(UsageError, match="multiple of the leaf size"):
        v.resume_at(LEAF + 1)
    with pytest.raises(UsageError, match="outside"):
        v.resume_at(4 * LEAF)
    v.update(b"x")
    with pytest.raises(UsageError, match="before the first update"):
        v.resume_at(LEAF)


@pytest.mark.parametrize(
    ("data", "root"),
    [
        (b"", "3268b0f23673784c508665eef79ae6f7bbdb7151a08c11f8a3e7cd754cda6412"),
        (b"abc", "4b696b13caa2a1dbb1c507f99a9dcb65601975accebaf1582d923c4435a65831"),
        (bytes(5 << 20), "aac37c33381ed14682cce8c8bf46b054d59db2dc21072e80ebd5180d0f78aaf9"),
    ],
)
def test_vectors_in_the_docs(data: bytes, root: str) -> None:
    assert tree_of(data, DEFAULT_LEAF_SIZE).root == root
