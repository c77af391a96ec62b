"""Hashing: digests of images and files, and the verifiers a fetch checks bytes with.

Plain inputs only (an algorithm name, an expected value, a path): nothing here knows
the cache, the image client or the fetch engine, so each of them can import it.

A :class:`Verifier` is fed every byte of an image in order and then says whether the
bytes are the ones the image service vouches for. :func:`verifier_for` picks the
fastest one the image record offers:

- a sha256 hash tree when the image publishes ``cowfleet_tree_sha256`` (our image
  service; the tree, checked against that root, comes from
  :meth:`cowfleet.images.client.ImageClient.get_tree`): each 4 MiB leaf is checked as it
  lands, and sha256 runs at about twice sha512's speed here;
- else ``os_hash_algo``/``os_hash_value`` (sha512 on real Glance);
- else the md5 ``checksum`` of older Glance records.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from cowfleet.errors import IntegrityError, LocalIOError, UsageError
from cowfleet.hashtree import Tree, TreeVerifier

ALLOWED_HASHES = ("sha512", "sha384", "sha256", "sha3_512", "sha3_256", "md5", "sha1")
READ_SIZE = 4 * 1024 * 1024


class Pacer(Protocol):
    """Paces reads (see :class:`cowfleet.cache.verify.RateLimit`)."""

    def spend(self, n: int) -> None: ...


class Verifier(Protocol):
    """Fed every byte of one image in order; :meth:`verify` raises on a mismatch."""

    name: str  # what it checks with, for logs ("sha512", "sha256 tree")

    def update(self, chunk: bytes | memoryview) -> None: ...

    def verify(self) -> None: ...


VerifierFactory = Callable[[], Verifier]


@runtime_checkable
class Resumable(Protocol):
    """A verifier whose pieces stand alone (the hash tree): bytes it checked in an
    earlier run need not be read again. A whole-image digest is not one: its state
    needs every byte from 0."""

    @property
    def key(self) -> str:
        """What the bytes are checked against (equal keys: the same expected bytes)."""
        ...

    @property
    def verified(self) -> int:
        """Bytes from 0 checked so far (whole pieces)."""
        ...

    def whole(self, n: int) -> int:
        """``n`` bytes cut down to whole pieces (``n`` itself at the image's end)."""
        ...

    def skip(self, upto: int) -> int:
        """Before any update: take the bytes before ``upto``, cut down to a piece
        boundary, as checked; returns where the stream continues."""
        ...


def new_hasher(algo: str) -> hashlib._Hash:
    """A hashlib object for one of :data:`ALLOWED_HASHES` (``-`` may stand for ``_``)."""
    name = algo.lower().replace("-", "_")
    if name not in ALLOWED_HASHES:
        raise IntegrityError(f"unsupported hash algorithm {algo!r}", hash_algo=algo)
    return hashlib.new(name)


class DigestVerifier:
    """One whole-image digest (``os_hash_value`` or the md5 ``checksum``)."""

    def __init__(self, algo: str, value: str, *, image_id: str) -> None:
        self._hasher = new_hasher(algo)
        self.name = algo.lower()
        self.value = value.lower()
        self.image_id = image_id

    def update(self, chunk: bytes | memoryview) -> None:
        self._hasher.update(chunk)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def verify(self) -> None:
        digest = self._hasher.hexdigest()
        if not hmac.compare_digest(digest, self.value):
            raise IntegrityError(
                f"image {self.image_id}: {self.name} mismatch: expected "
                f"{self.value[:16]}..., got {digest[:16]}...",
                image_id=self.image_id,
                expected=self.value,
                actual=digest,
            )


class TreeCheck:
    """The sha256 hash tree: raises at the first leaf that is not the tree's."""

    name = "sha256 tree"

    def __init__(
        self, tree: Tree, *, image_id: str, checked_by: TreeVerifier | None = None
    ) -> None:
        """``checked_by``: the verifier that checked this stream's pieces as they arrived
        (:class:`cowfleet.fetch.sources.Sources`); the leaves it passed are not hashed
        again (see :meth:`~cowfleet.hashtree.TreeVerifier.follower`)."""
        if checked_by is None:
            self._verifier = TreeVerifier.from_tree(tree, image_id=image_id)
        elif checked_by.tree != tree:
            raise UsageError(f"image {image_id}: the piece checker has another hash tree")
        else:
            self._verifier = checked_by.follower()
        # The root commits to the leaf size, the length and every leaf.
        self.key = f"sha256 tree {tree.root}"

    @property
    def verified(self) -> int:
        return self._verifier.verified

    def whole(self, n: int) -> int:
        tree = self._verifier.tree
        n = max(0, min(n, tree.length))
        return n if n == tree.length else n // tree.leaf_size * tree.leaf_size

    def skip(self, upto: int) -> int:
        leaf = self._verifier.tree.leaf_size
        offset = max(0, min(upto, self._verifier.tree.length)) // leaf * leaf
        self._verifier.resume_at(offset)
        return offset

    def update(self, chunk: bytes | memoryview) -> None:
        self._verifier.update(chunk)

    def verify(self) -> None:
        self._verifier.finish()


class AllOf:
    """Several verifiers over one stream (a hash tree and the whole-image digest): every
    one must pass."""

    def __init__(self, *verifiers: Verifier) -> None:
        self._verifiers = verifiers
        self.name = " + ".join(v.name for v in verifiers)

    def update(self, chunk: bytes | memoryview) -> None:
        for v in self._verifiers:
            v.update(chunk)

    def verify(self) -> None:
        for v in self._verifiers:
            v.verify()


class SizeOnly:
    """No digest to check (an image service that gives none): the size alone is checked."""

    name = "size only"

    def update(self, chunk: bytes | memoryview) -> None:
        pass

    def verify(self) -> None:
        pass


def image_digest(
    os_hash_algo: str | None, os_hash_value: str | None, checksum: str | None
) -> tuple[str, str] | None:
    """(algorithm, lower-case hex value) the image record vouches for, or None."""
    if os_hash_algo and os_hash_value:
        return os_hash_algo.lower(), os_hash_value.lower()
    if checksum:
        return "md5", checksum.lower()
    return None


def verifier_for(
    image_id: str,
    digest: tuple[str, str] | None,
    tree: Tree | None = None,
    *,
    checked_by: TreeVerifier | None = None,
) -> VerifierFactory:
    """A factory of the verifier to use: the hash tree when given, else the digest,
    else :class:`SizeOnly`. A factory, because a restarted fetch starts a fresh one.
    ``checked_by``: see :class:`TreeCheck`."""
    if tree is not None:
        return lambda: TreeCheck(tree, image_id=image_id, checked_by=checked_by)
    if digest is not None:
        algo, value = digest
        new_hasher(algo)  # refuse an unknown algorithm before any byte is fetched
        return lambda: DigestVerifier(algo, value, image_id=image_id)
    return SizeOnly


def tree_and_digest(
    image_id: str,
    digest: tuple[str, str],
    tree: Tree,
    *,
    checked_by: TreeVerifier | None = None,
) -> VerifierFactory:
    """The hash tree (each leaf as it lands) *and* the whole-image digest: a fetch that
    takes bytes from peers still checks ``os_hash_value`` over its own stream.
    ``checked_by``: see :class:`TreeCheck`."""
    algo, value = digest
    new_hasher(algo)
    return lambda: AllOf(
        TreeCheck(tree, image_id=image_id, checked_by=checked_by),
        DigestVerifier(algo, value, image_id=image_id),
    )


def hash_file(path: Path, algo: str, *, limit: Pacer | None = None) -> str:
    """Digest of a file (no symlinks followed), read 4 MiB at a time (paced by ``limit``)."""
    h = new_hasher(algo)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalIOError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
    try:
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except OSError as exc:
                raise LocalIOError(
                    f"cannot read {path}: {exc.strerror}", path=str(path), errno=exc.errno
                ) from exc
            if not data:
                break
            h.update(data)
            if limit is not None:
                limit.spend(len(data))
    finally:
        os.close(fd)
    return h.hexdigest()
