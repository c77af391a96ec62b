"""A sha256 hash tree over fixed-size leaves (sans-I/O): build it, verify against it.

The format (see ``docs/image-service.md``, "Hash tree"):

- the image is cut into leaves of ``leaf_size`` bytes (a power of two, at least
  :data:`MIN_LEAF_SIZE`); the last leaf may be shorter; an empty image has no leaves;
- each leaf digest is ``sha256(leaf bytes)`` (32 bytes);
- the leaf list is the leaf digests concatenated in order (``32 * n`` bytes);
- the root is ``sha256(PREFIX || leaf_size || length || leaf list)``, where
  :data:`PREFIX` separates this use of sha256 from every other, and ``leaf_size`` and
  ``length`` (the image size in bytes) are 8-byte big-endian unsigned integers.

Why a tree rather than one digest: sha256 with the CPU's SHA extensions runs at about
twice the speed of sha512, each leaf can be checked on its own as it lands (a piece
from a peer, a resumed range), and a leaf list of 32 bytes per 4 MiB is small enough to
fetch and check in full before the data.

:class:`TreeBuilder` computes a :class:`Tree` from bytes fed in any chunking;
:class:`TreeVerifier` takes a published root and leaf list, refuses a leaf list that
does not hash to the root, then checks leaves one at a time (:meth:`~TreeVerifier.check_leaf`)
or a stream (:meth:`~TreeVerifier.update` / :meth:`~TreeVerifier.finish`). Failures are
:class:`~cowfleet.errors.IntegrityError` naming the image, the leaf and its byte offset.
Nothing here opens a file or a socket.

Use in a fetch (the tree from :meth:`cowfleet.images.client.ImageClient.get_tree`, which
has already checked the leaf list against the published root)::

    verifier = TreeVerifier.from_tree(tree, image_id=image.id)
    verifier.resume_at(offset)      # optional: continue a part file at a leaf boundary
    for chunk in stream:
        verifier.update(chunk)      # raises at the first bad leaf
        sink.write(chunk)
    verifier.finish()               # the short last leaf; refuses a short stream

or, for pieces that arrive out of order (a peer's leaves, ranges):
``verifier.check_leaf(index, data)`` with :meth:`Tree.span` giving each leaf's offset
and size.

A node that checks each piece as it arrives and then verifies its own stream in order
(:mod:`cowfleet.fetch.sources`, then the fetch engine) hashes each leaf once: the stream
verifier from :meth:`TreeVerifier.follower` takes a leaf that the piece checker passed
when it is handed that very buffer, untouched, at that leaf's place in the stream.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cowfleet.errors import IntegrityError, UsageError

PREFIX = b"cowfleet sha256 tree v1\x00"
DIGEST_SIZE = 32
MIN_LEAF_SIZE = 64 * 1024
MAX_LEAF_SIZE = 1024 * 1024 * 1024
DEFAULT_LEAF_SIZE = 4 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
# The image properties through which the image service publishes an image's tree (its
# leaf list is served at ``GET /v2/images/{id}/tree``). Glance properties are strings.
ROOT_PROPERTY = "cowfleet_tree_sha256"
LEAF_SIZE_PROPERTY = "cowfleet_tree_leaf_size"

Buffer = bytes | bytearray | memoryview
# Called with (digest, offset, size) as each leaf completes.
_OnLeaf = Callable[[bytes, int, int], None]


def check_leaf_size(leaf_size: int) -> int:
    """``leaf_size`` if it is a power of two from 64 KiB to 1 GiB, else UsageError."""
    if (
        isinstance(leaf_size, bool)
        or not isinstance(leaf_size, int)
        or not MIN_LEAF_SIZE <= leaf_size <= MAX_LEAF_SIZE
        or leaf_size & (leaf_size - 1)
    ):
        raise UsageError(
            f"hash tree leaf size must be a power of two from {MIN_LEAF_SIZE} to "
            f"{MAX_LEAF_SIZE} bytes, not {leaf_size!r}"
        )
    return leaf_size


def leaf_count(length: int, leaf_size: int) -> int:
    """How many leaves an image of ``length`` bytes has."""
    return -(-length // leaf_size)


def root_of(leaf_size: int, length: int, leaves: Buffer) -> str:
    """The root (hex) of a leaf list, as defined in the module docstring."""
    h = hashlib.sha256(PREFIX)
    h.update(leaf_size.to_bytes(8, "big"))
    h.update(length.to_bytes(8, "big"))
    h.update(leaves)
    return h.hexdigest()


@dataclass(frozen=True)
class Tree:
    """A hash tree: the leaf size, the image length, the leaf list and its root (hex).

    The shape is checked on creation (leaf size, ``32 * leaf_count`` bytes of leaves,
    a 64-digit lowercase hex root); that the leaves hash to the root is
    :class:`TreeVerifier`'s check.
    """

    leaf_size: int
    length: int
    leaves: bytes
    root: str

    def __post_init__(self) -> None:
        check_leaf_size(self.leaf_size)
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise UsageError(f"hash tree length must be a non-negative integer: {self.length!r}")
        want = leaf_count(self.length, self.leaf_size) * DIGEST_SIZE
        if len(self.leaves) != want:
            raise IntegrityError(
                f"hash tree leaf list of {len(self.leaves)} bytes; {self.length} bytes in "
                f"leaves of {self.leaf_size} need {want}",
                length=self.length,
                leaf_size=self.leaf_size,
            )
        if not isinstance(self.root, str) or not _HEX64.fullmatch(self.root):
            raise IntegrityError(f"hash tree root is not 64 lowercase hex digits: {self.root!r}")

    @property
    def count(self) -> int:
        """Number of leaves."""
        return len(self.leaves) // DIGEST_SIZE

    def digest(self, index: int) -> bytes:
        """The 32-byte digest of leaf ``index``."""
        return self.leaves[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def span(self, index: int) -> tuple[int, int]:
        """``(offset, size)`` in bytes of leaf ``index`` (IndexError when out of range)."""
        if not 0 <= index < self.count:
            raise IndexError(f"leaf {index} of a tree with {self.count} leaves")
        offset = index * self.leaf_size
        return offset, min(self.leaf_size, self.length - offset)


class _LeafHasher:
    """Cuts a byte stream into leaves and hashes each; calls ``on_leaf`` per full leaf.

    No copies: each piece of a chunk goes straight to ``hashlib`` (which releases the
    GIL for large buffers), a leaf spanning chunks is hashed incrementally.
    """

    def __init__(self, leaf_size: int) -> None:
        self.leaf_size = check_leaf_size(leaf_size)
        self.length = 0
        self._hash = hashlib.sha256()
        self._filled = 0  # bytes of the current leaf hashed so far

    def feed(self, buf: Buffer, on_leaf: _OnLeaf) -> None:
        with memoryview(buf) as raw, raw.cast("B") as view:
            done, size = 0, len(view)
            while done < size:
                n = min(self.leaf_size - self._filled, size - done)
                with view[done : done + n] as part:
                    self._hash.update(part)
                self._filled += n
                self.length += n
                done += n
                if self._filled == self.leaf_size:
                    self._complete(on_leaf)

    @property
    def at_boundary(self) -> bool:
        """No part of a leaf hashed yet."""
        return self._filled == 0

    def flush(self, on_leaf: _OnLeaf) -> None:
        """The short last leaf, if any."""
        if self._filled:
            self._complete(on_leaf)

    def _complete(self, on_leaf: _OnLeaf) -> None:
        digest, size = self._hash.digest(), self._filled
        self._hash = hashlib.sha256()
        self._filled = 0
        on_leaf(digest, self.length - size, size)


class TreeBuilder:
    """``update(buf)`` with the bytes in order (any chunk sizes), then ``finish()``."""

    def __init__(self, leaf_size: int = DEFAULT_LEAF_SIZE) -> None:
        self._leaves = _LeafHasher(leaf_size)
        self._digests = bytearray()
        self._finished = False

    @property
    def length(self) -> int:
        """Bytes fed so far."""
        return self._leaves.length

    def _add(self, digest: bytes, _offset: int, _size: int) -> None:
        self._digests += digest

    def update(self, buf: Buffer) -> None:
        if self._finished:
            raise UsageError("hash tree builder already finished")
        self._leaves.feed(buf, self._add)

    def finish(self) -> Tree:
        if not self._finished:
            self._leaves.flush(self._add)
            self._finished = True
        leaves = bytes(self._digests)
        size, length = self._leaves.leaf_size, self._leaves.length
        return Tree(size, length, leaves, root_of(size, length, leaves))


def tree_of(data: Buffer, leaf_size: int = DEFAULT_LEAF_SIZE) -> Tree:
    """The tree of ``data`` in one call."""
    builder = TreeBuilder(leaf_size)
    builder.update(data)
    return builder.finish()


class _Passed:
    """Leaves :meth:`TreeVerifier.check_leaf` passed, each with the buffer that held them
    (a ``bytes`` or ``bytearray``, whole): shared by a verifier and its followers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the checker and the follower run in two threads
        self._held: dict[int, bytes | bytearray] = {}

    def add(self, index: int, buf: bytes | bytearray) -> None:
        with self._lock:
            self._held[index] = buf

    def take(self, index: int, view: memoryview) -> bool:
        """Whether ``view`` is the whole buffer leaf ``index`` passed in (forgets it, and
        every leaf before it: a stream goes forward)."""
        with self._lock:
            held = self._held.pop(index, None)
            for old in [i for i in self._held if i < index]:
                del self._held[old]
        return held is not None and view.obj is held and view.nbytes == len(held)


class TreeVerifier:
    """Checks bytes against a published root and leaf list.

    The constructor refuses (IntegrityError) a leaf list of the wrong size or one that
    does not hash to ``root_hex``. Then either check pieces as they land with
    :meth:`check_leaf`, or feed the whole image in order with :meth:`update` and end
    with :meth:`finish`; each raises at the first bad leaf, naming its index and offset.
    """

    def __init__(
        self,
        root_hex: str,
        leaf_size: int,
        length: int,
        leaves: Buffer,
        *,
        image_id: str = "",
    ) -> None:
        self.image_id = image_id
        what = f"image {image_id}" if image_id else "image"
        root = root_hex.lower() if isinstance(root_hex, str) else root_hex
        try:
            tree = Tree(leaf_size, length, bytes(leaves), root)
        except IntegrityError as exc:
            raise IntegrityError(f"{what}: {exc}", image_id=image_id, **exc.context) from None
        actual = root_of(leaf_size, length, tree.leaves)
        if not hmac.compare_digest(actual, tree.root):
            raise IntegrityError(
                f"{what}: the hash tree leaf list does not match its root "
                f"(published {tree.root}, leaves hash to {actual})",
                image_id=image_id,
                expected=tree.root,
                actual=actual,
            )
        self.tree = tree
        self._what = what
        self._stream = _LeafHasher(leaf_size)
        self._index = 0  # next leaf the stream completes
        self._passed: _Passed | None = None  # leaves check_leaf passed, for followers
        self._trusted: _Passed | None = None  # a follower's: its leader's passed leaves

    @classmethod
    def from_tree(cls, tree: Tree, *, image_id: str = "") -> TreeVerifier:
        return cls(tree.root, tree.leaf_size, tree.length, tree.leaves, image_id=image_id)

    def _mismatch(self, index: int, offset: int, problem: str) -> IntegrityError:
        return IntegrityError(
            f"{self._what}: leaf {index} at byte offset {offset}: {problem}",
            image_id=self.image_id,
            leaf=index,
            offset=offset,
        )

    def check_leaf(self, index: int, data: Buffer) -> None:
        """Check one whole leaf (``data`` its bytes); IntegrityError if it is not the one
        the tree names (wrong size or wrong digest), IndexError past the last leaf."""
        offset, size = self.tree.span(index)
        with memoryview(data) as raw, raw.cast("B") as view:
            if len(view) != size:
                raise self._mismatch(index, offset, f"{len(view)} bytes where {size} belong")
            digest = hashlib.sha256(view).digest()
        if not hmac.compare_digest(digest, self.tree.digest(index)):
            raise self._mismatch(index, offset, "sha256 does not match the hash tree")
        if self._passed is not None and isinstance(data, bytes | bytearray):
            self._passed.add(index, data)

    def follower(self) -> TreeVerifier:
        """A fresh stream verifier (:meth:`update`, :meth:`finish`) of the same tree that
        does not hash a leaf again when :meth:`update` is handed, at that leaf's place in
        the stream, the whole ``bytes``/``bytearray`` this verifier's :meth:`check_leaf`
        passed for it. Every other byte it hashes as usual; :meth:`finish` still refuses
        a short stream. The checker's caller must not change a buffer after passing it
        (the fetch's pieces are fresh buffers, written once)."""
        if self._passed is None:
            self._passed = _Passed()
        twin = TreeVerifier.from_tree(self.tree, image_id=self.image_id)
        twin._trusted = self._passed
        return twin

    @property
    def verified(self) -> int:
        """Bytes of the stream verified so far (whole leaves from the start)."""
        return min(self._index * self.tree.leaf_size, self.tree.length)

    def _stream_leaf(self, digest: bytes, offset: int, size: int) -> None:
        index = self._index
        if not hmac.compare_digest(digest, self.tree.digest(index)):
            raise self._mismatch(index, offset, "sha256 does not match the hash tree")
        self._index += 1

    def resume_at(self, offset: int) -> None:
        """Continue the stream at ``offset`` (a leaf boundary, or the length): the bytes
        before it are taken as checked (e.g. a part file whose leaves passed
        :meth:`check_leaf`). Only before the stream has started."""
        if self._stream.length or self._index:
            raise UsageError("resume_at() must come before the first update()")
        if offset % self.tree.leaf_size and offset != self.tree.length:
            raise UsageError(
                f"resume offset {offset} is not a multiple of the leaf size {self.tree.leaf_size}"
            )
        if not 0 <= offset <= self.tree.length:
            raise UsageError(f"resume offset {offset} is outside 0..{self.tree.length}")
        self._index = leaf_count(offset, self.tree.leaf_size)
        self._stream.length = offset

    def update(self, buf: Buffer) -> None:
        """The next bytes of the image, in order; raises at the first bad leaf, or when
        the bytes run past the image's length."""
        with memoryview(buf) as view:
            if self._stream.length + view.nbytes > self.tree.length:
                raise IntegrityError(
                    f"{self._what}: more than the {self.tree.length} bytes the hash tree "
                    f"covers (at byte offset {self.tree.length})",
                    image_id=self.image_id,
                    offset=self.tree.length,
                )
            trusted = self._trusted
            if (
                trusted is not None
                and self._stream.at_boundary
                and self._index < self.tree.count
                and trusted.take(self._index, view)
            ):  # this very leaf passed check_leaf: not hashed again
                self._stream.length += view.nbytes
                self._index += 1
                return
            self._stream.feed(view, self._stream_leaf)

    def finish(self) -> None:
        """End of the stream: checks the short last leaf, and that nothing is missing."""
        got = self._stream.length
        if got < self.tree.length:
            index = got // self.tree.leaf_size
            raise self._mismatch(
                index,
                index * self.tree.leaf_size,
                f"the data ends at byte {got} of {self.tree.length}",
            )
        self._stream.flush(self._stream_leaf)
