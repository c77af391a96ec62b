"""Several sources for one fetch: peers first, the origin (the image service) last.

A :class:`Sources` is the engine's :data:`~cowfleet.fetch.engine.OpenStream` over an
ordered list of :class:`Source` objects. Every byte it hands to the engine belongs to a
hash-tree leaf that passed :meth:`~cowfleet.hashtree.TreeVerifier.check_leaf`: a
source's body is cut into leaves, each leaf is checked whole and only then passed on
(the part of it before the asked offset is dropped). So a file fed by a
:class:`Sources` never holds an unchecked byte, which is what lets a node serve its
download in progress to other nodes (:mod:`cowfleet.node.peers`).

When a peer fails (refused, 404, a transport error, a stall longer than its timeout, a
body that ends early, a piece that does not match the tree) the next source takes over
at once at the same offset (:class:`~cowfleet.fetch.engine.SourceSwitch`: no backoff);
a peer that sent a bad piece is reported (``on_corrupt``) and not asked again. The
origin is the last source: its failures go to the engine's ordinary retries.

The engine still runs its own verifier (the tree and the whole-image digest) and the
format inspector over the node's own stream: nothing here replaces them. Given
:attr:`Sources.checker` (``checked_by`` of :func:`cowfleet.digest.tree_and_digest`), its
tree check takes the leaves this module passed, as handed on, without hashing them a
second time (:meth:`~cowfleet.hashtree.TreeVerifier.follower`): each leaf is hashed
once per node, and the root still covers every byte of the stream.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from cowfleet.errors import (
    BackendUnavailableError,
    IntegrityError,
    NotFoundError,
    RemoteError,
    TimeoutError_,
    UsageError,
    ValidationError,
)
from cowfleet.fetch.buffers import EXTENSION, BufferPool
from cowfleet.fetch.engine import SourceSwitch, StreamLike
from cowfleet.hashtree import Tree, TreeVerifier

log = logging.getLogger(__name__)

MAX_SOURCES = 16
PEER_PATH = "/peer/v1/images/"
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_URL_RE = re.compile(r"^https?://[^\s/?#]+/?$")
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

# Failures of one source that another may not share (never a local disk error).
SWITCHABLE: tuple[type[BaseException], ...] = (
    BackendUnavailableError,
    TimeoutError_,
    NotFoundError,
    UsageError,
    ValidationError,
    IntegrityError,
)


@dataclass(frozen=True)
class Peer:
    """A node agent that may hold the image: its hostname and its base URL."""

    host: str
    url: str

    @classmethod
    def from_json(cls, item: Any) -> Peer:
        if not isinstance(item, dict):
            raise ValidationError('each source must be an object {"host": ..., "url": ...}')
        host, url = item.get("host"), item.get("url")
        if not isinstance(host, str) or not _HOST_RE.match(host):
            raise ValidationError(f"source host must be a node hostname, not {host!r}")
        if not isinstance(url, str) or not _URL_RE.match(url):
            raise ValidationError(
                f"source url must be a node agent's http(s)://host[:port], not {url!r}"
            )
        return cls(host, url.rstrip("/"))

    def to_dict(self) -> dict[str, str]:
        return {"host": self.host, "url": self.url}


def parse_sources(data: Any) -> tuple[Peer, ...]:
    """The optional ``sources`` of a build or pre-cache request (None: none)."""
    if data is None:
        return ()
    if not isinstance(data, list) or len(data) > MAX_SOURCES:
        raise ValidationError(f"sources must be a list of at most {MAX_SOURCES} objects")
    peers = tuple(Peer.from_json(item) for item in data)
    if len({p.host for p in peers}) != len(peers):
        raise ValidationError("sources names a host twice")
    return peers


class Source(Protocol):
    name: str  # "origin" or the peer's hostname
    peer: bool

    def open(self, offset: int, pool: BufferPool) -> AbstractContextManager[StreamLike]: ...


class OriginSource:
    """The image service (through the caller's ``open_download``)."""

    name = "origin"
    peer = False

    def __init__(
        self, open_download: Callable[[int, BufferPool], AbstractContextManager[StreamLike]]
    ) -> None:
        self._open = open_download

    def open(self, offset: int, pool: BufferPool) -> AbstractContextManager[StreamLike]:
        return self._open(offset, pool)


@dataclass
class _PeerStream:
    status: int
    offset: int
    total_size: int | None
    _resp: httpx.Response
    _what: str

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        # The pieces as the transport reads them (the data transport: whole pooled
        # buffers): :class:`_Checked` re-cuts them into leaves, so no re-chunking here.
        try:
            yield from self._resp.iter_raw()
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{self._what}: stalled ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(f"{self._what}: {exc or type(exc).__name__}") from exc


class PeerSource:
    """Another node agent: ``GET /peer/v1/images/{id}`` with ``Range`` and the node token.

    ``stall`` seconds without a byte count as a failure (the next source takes over).
    """

    peer = True

    def __init__(
        self, peer: Peer, image_id: str, token: str, client: httpx.Client, *, stall: float
    ) -> None:
        self.name = peer.host
        self.peer_info = peer
        self._url = f"{peer.url}{PEER_PATH}{image_id}"
        self._token = token
        self._client = client
        self._stall = stall
        self._what = f"peer {peer.host} ({peer.url}), image {image_id}"

    def open(self, offset: int, pool: BufferPool) -> AbstractContextManager[StreamLike]:
        return self._open(offset, pool)

    @contextmanager
    def _open(self, offset: int, pool: BufferPool) -> Iterator[StreamLike]:
        headers = {"X-Auth-Token": self._token, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = httpx.Timeout(self._stall)
        try:
            # A transport that reads into caller buffers (the data transport) uses the pool.
            request = self._client.build_request(
                "GET", self._url, headers=headers, timeout=timeout, extensions={EXTENSION: pool}
            )
            resp = self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{self._what}: timed out ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(f"{self._what}: {exc or type(exc).__name__}") from exc
        try:
            status = resp.status_code
            if status == 404:
                raise NotFoundError(f"{self._what}: the peer does not hold it (404)", status=404)
            if status == 401:
                raise UsageError(f"{self._what}: the peer refused the node token (401)")
            if status == 206:
                m = CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
                if m is None:
                    raise RemoteError(f"{self._what}: bad Content-Range", status=206)
                total = None if m.group(3) == "*" else int(m.group(3))
                yield _PeerStream(206, int(m.group(1)), total, resp, self._what)
            elif status == 200:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                yield _PeerStream(200, 0, total, resp, self._what)
            else:
                raise RemoteError(f"{self._what}: HTTP {status}", status=status)
        finally:
            resp.close()


class _CorruptPiece(IntegrityError):
    """A leaf from a source does not match the hash tree."""


class _Checked:
    """A source's answer re-cut into whole checked leaves, from ``offset`` on."""

    def __init__(
        self,
        raw: StreamLike,
        start: int,
        offset: int,
        verifier: TreeVerifier,
        pool: BufferPool,
        what: str,
        delivered: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.status = 206 if offset else 200
        self.offset = offset
        self.total_size = raw.total_size
        self._raw = raw
        self._start = start  # leaf boundary the source was asked from
        self._verifier = verifier
        self._pool = pool
        self._what = what
        self._delivered = delivered

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[memoryview]:
        tree = self._verifier.tree
        leaf_size = tree.leaf_size
        pos = self._start
        skip = self.offset - self._start  # bytes of the first leaf the engine has
        index = pos // leaf_size
        buf: bytearray | None = None
        filled = 0
        for chunk in self._raw.iter_chunks(chunk_size):
            view = memoryview(chunk).cast("B")
            done = 0
            try:
                while done < len(view):
                    if index >= tree.count:
                        raise _CorruptPiece(f"{self._what}: more bytes than the image has")
                    _, size = tree.span(index)
                    if buf is None:
                        buf = bytearray(size)  # fresh: the writer may still hold the last one
                        filled = 0
                    n = min(size - filled, len(view) - done)
                    buf[filled : filled + n] = view[done : done + n]
                    filled += n
                    done += n
                    if filled == size:
                        try:
                            self._verifier.check_leaf(index, buf)
                        except IntegrityError as exc:
                            raise _CorruptPiece(f"{self._what}: {exc}") from exc
                        out = memoryview(buf)[skip:] if skip else memoryview(buf)
                        skip = 0
                        buf = None
                        index += 1
                        pos += size
                        self._delivered(len(out))
                        yield out
            finally:
                view.release()
                self._pool.give(chunk)
        if pos < tree.length:
            raise BackendUnavailableError(
                f"{self._what}: the body ended at byte {pos + filled} of {tree.length}"
            )


class Sources:
    """The engine's ``OpenStream`` over ``sources`` in order (see the module doc).

    ``on_corrupt(source_name, reason)`` is called for a peer whose piece did not match
    the tree; ``on_switch(source_name)`` each time a source takes over (for progress).
    :attr:`delivered` counts, per source name, the checked bytes each one handed to the
    engine (what the node's metrics and its pre-cache report are labelled by).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        tree: Tree,
        image_id: str,
        *,
        on_corrupt: Callable[[str, str], None] = lambda _name, _reason: None,
        on_switch: Callable[[str], None] = lambda _name: None,
    ) -> None:
        if not sources:
            raise UsageError("a fetch needs at least one source")
        self._sources = list(sources)
        self._verifier = TreeVerifier.from_tree(tree, image_id=image_id)
        self._image_id = image_id
        self._index = 0
        self._on_corrupt = on_corrupt
        self._on_switch = on_switch
        self.failed: list[tuple[str, str]] = []  # (source, why) in order
        self.used: list[str] = []  # sources that delivered an answer, in order
        self.delivered: dict[str, int] = {}  # source name -> checked bytes handed on

    @property
    def checker(self) -> TreeVerifier:
        """The verifier every leaf this hands on passed: give it to the engine's tree
        check (``checked_by``) so that those leaves are not hashed twice."""
        return self._verifier

    @property
    def main(self) -> str:
        """The source that delivered the most bytes (the current one before any)."""
        if not self.delivered:
            return self.current.name
        return max(self.delivered.items(), key=lambda kv: kv[1])[0]

    def is_peer(self, name: str) -> bool:
        return any(s.peer for s in self._sources if s.name == name)

    def _count(self, name: str) -> Callable[[int], None]:
        def add(n: int) -> None:
            self.delivered[name] = self.delivered.get(name, 0) + n

        return add

    @property
    def current(self) -> Source:
        return self._sources[self._index]

    def _give_up_on(self, src: Source, exc: BaseException) -> None:
        """``src`` failed: note why, report a bad piece, move to the next source."""
        reason = str(exc)
        self.failed.append((src.name, reason))
        if isinstance(exc, _CorruptPiece):
            log.error("image %s: peer %s sent a bad piece: %s", self._image_id, src.name, reason)
            self._on_corrupt(src.name, reason)
        else:
            log.warning("image %s: source %s failed: %s", self._image_id, src.name, reason)
        self._index += 1
        self._on_switch(self.current.name)

    def __call__(self, offset: int, pool: BufferPool) -> AbstractContextManager[StreamLike]:
        return self._open(offset, pool)

    @contextmanager
    def _open(self, offset: int, pool: BufferPool) -> Iterator[StreamLike]:
        leaf = self._verifier.tree.leaf_size
        start = offset - offset % leaf
        while True:
            src = self.current
            try:
                cm = src.open(start, pool)
                raw = cm.__enter__()
            except SWITCHABLE as exc:
                if not src.peer or self._index + 1 >= len(self._sources):
                    raise
                self._give_up_on(src, exc)
                continue
            break
        try:
            if (raw.status == 206 and raw.offset == start) or (raw.status == 200 and start == 0):
                checked = _Checked(
                    raw, start, offset, self._verifier, pool, src.name, self._count(src.name)
                )
            else:
                raise RemoteError(
                    f"source {src.name}: asked for bytes from {start}, got status "
                    f"{raw.status} from {raw.offset}",
                    status=raw.status,
                )
            self.used.append(src.name)
            yield checked
        except SWITCHABLE as exc:
            cm.__exit__(type(exc), exc, exc.__traceback__)
            if not src.peer or self._index + 1 >= len(self._sources):
                raise
            self._give_up_on(src, exc)
            raise SourceSwitch(f"source {src.name} failed; {self.current.name} takes over") from exc
        except BaseException as exc:
            cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            cm.__exit__(None, None, None)
