"""A striped fetch: each stripe of the image from its own chain of sources, at once.

The API may plan an image's distribution in ``k`` stripes
(:mod:`cowfleet.distribution.stripes`): leaf ``i`` of the hash tree belongs to stripe
``i % k``, and each stripe has its own chain of sources (peers in order, the origin
last). :class:`StripedSources` is the engine's
:data:`~cowfleet.fetch.engine.OpenStream` for such a plan:

- ``open(offset)`` starts one reader thread per stripe. A reader asks its stripe's
  current source for that stripe's leaves from the first one it needs (a peer:
  ``GET /peer/v1/images/{id}?stripe=t&stripes=k&leaf=SIZE`` with ``Range: bytes=a-``,
  whose body is only those leaves; the origin, which knows nothing of stripes: one
  bounded ``Range: bytes=a-b`` request per leaf on the client's kept-alive
  connection), cuts the body into leaves, checks each whole leaf against the tree and
  only then puts it in the stripe's bounded queue;
- the stream the engine reads takes the leaves from the queues in index order, so the
  engine (and the disk) still see one checked prefix growing in order: landing, the
  engine's own verifier and inspector, and the live download peers stream from
  (:mod:`cowfleet.cache.live`) are unchanged;
- a stripe's source that fails (refused, 404, a transport error, a stall, a body that
  ends early, a leaf that does not match the tree) is dropped for that stripe and the
  next one in its chain continues at once from the same leaf; a bad leaf is reported
  (``on_corrupt``) as with :class:`~cowfleet.fetch.sources.Sources`. The origin is
  last: its failure ends the stream, and the engine's retries open it again at the
  offset reached (the stripes keep the source they had come to).

Memory is bounded: each reader holds the leaf it is assembling and at most
:data:`QUEUE_LEAVES` checked leaves waiting for the engine, so a fetch holds at most
``k * (QUEUE_LEAVES + 1)`` leaves, plus the one the engine is writing (k=2, 4 MiB
leaves: 28 MiB). A stripe that runs ahead of the others waits when its queue is full.
"""

from __future__ import annotations

import logging
import queue
import threading
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
from cowfleet.fetch.buffers import BufferPool
from cowfleet.fetch.engine import StreamLike
from cowfleet.fetch.sources import (
    CONTENT_RANGE,
    MAX_SOURCES,
    PEER_PATH,
    SWITCHABLE,
    Peer,
    parse_sources,
)
from cowfleet.hashtree import Tree, TreeVerifier

log = logging.getLogger(__name__)

MIN_STRIPES, MAX_STRIPES = 2, 8
QUEUE_LEAVES = 2  # checked leaves a stripe may hold ahead of the engine
STRIPE_HEADER = "X-Cowfleet-Stripe"  # "t/k" on a peer's striped answer
_POLL = 0.1


def parse_stripes(data: Any) -> tuple[tuple[Peer, ...], ...]:
    """The optional ``stripes`` of a build or pre-cache request: a list of k lists of
    ``{"host", "url"}`` (the sources of each stripe, in order), 2 <= k <= 8 (None: none)."""
    if data is None:
        return ()
    if not isinstance(data, list) or not MIN_STRIPES <= len(data) <= MAX_STRIPES:
        raise ValidationError(
            f"stripes must be a list of {MIN_STRIPES} to {MAX_STRIPES} lists of sources"
        )
    out = []
    for t, item in enumerate(data):
        if not isinstance(item, list):
            raise ValidationError(f"stripes[{t}] must be a list of at most {MAX_SOURCES} sources")
        try:
            out.append(parse_sources(item))
        except ValidationError as exc:
            raise ValidationError(f"stripes[{t}]: {exc}") from None
    return tuple(out)


def stripes_to_json(stripes: Sequence[Sequence[Peer]]) -> list[list[dict[str, str]]]:
    return [[p.to_dict() for p in chain] for chain in stripes]


class StripeSource(Protocol):
    name: str  # "origin" or the peer's hostname
    peer: bool

    def open(
        self, stripe: int, stripes: int, first: int
    ) -> AbstractContextManager[Iterator[bytes | memoryview]]:
        """The bytes of leaves ``first``, ``first + stripes``, ... concatenated."""
        ...


class PeerStripes:
    """A node agent, asked for one stripe (see the module doc)."""

    peer = True

    def __init__(
        self,
        peer: Peer,
        image_id: str,
        tree: Tree,
        token: str,
        client: httpx.Client,
        *,
        stall: float,
    ) -> None:
        self.name = peer.host
        self._url = f"{peer.url}{PEER_PATH}{image_id}"
        self._tree = tree
        self._token = token
        self._client = client
        self._stall = stall
        self._what = f"peer {peer.host} ({peer.url}), image {image_id}"

    def open(
        self, stripe: int, stripes: int, first: int
    ) -> AbstractContextManager[Iterator[bytes | memoryview]]:
        return self._open(stripe, stripes, first)

    @contextmanager
    def _open(self, stripe: int, stripes: int, first: int) -> Iterator[Iterator[bytes]]:
        start, _ = self._tree.span(first)
        what = f"{self._what}, stripe {stripe}/{stripes}"
        headers = {
            "X-Auth-Token": self._token,
            "Accept-Encoding": "identity",
            "Range": f"bytes={start}-",
        }
        params = {"stripe": stripe, "stripes": stripes, "leaf": self._tree.leaf_size}
        try:
            request = self._client.build_request(
                "GET", self._url, headers=headers, params=params, timeout=httpx.Timeout(self._stall)
            )
            resp = self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{what}: timed out ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(f"{what}: {exc or type(exc).__name__}") from exc
        try:
            status = resp.status_code
            if status == 404:
                raise NotFoundError(f"{what}: the peer does not hold it (404)", status=404)
            if status == 401:
                raise UsageError(f"{what}: the peer refused the node token (401)")
            if status != 206:
                raise RemoteError(f"{what}: HTTP {status}", status=status)
            m = CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
            if m is None or int(m.group(1)) != start:
                raise RemoteError(f"{what}: the answer does not start at byte {start}", status=206)
            if resp.headers.get(STRIPE_HEADER) != f"{stripe}/{stripes}":
                raise ValidationError(f"{what}: the peer did not answer with the stripe")
            yield self._chunks(resp, what)
        finally:
            resp.close()

    @staticmethod
    def _chunks(resp: httpx.Response, what: str) -> Iterator[bytes]:
        try:
            yield from resp.iter_raw(1 << 20)
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{what}: stalled ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(f"{what}: {exc or type(exc).__name__}") from exc


# (first byte, last byte inclusive) -> the image service's answer for those bytes
OpenRange = Callable[[int, int], AbstractContextManager[StreamLike]]


class OriginStripes:
    """The image service, which serves plain ranges: one ``bytes=a-b`` per leaf."""

    name = "origin"
    peer = False

    def __init__(self, open_range: OpenRange, tree: Tree) -> None:
        self._open_range = open_range
        self._tree = tree

    def open(
        self, stripe: int, stripes: int, first: int
    ) -> AbstractContextManager[Iterator[bytes | memoryview]]:
        return self._open(stripes, first)

    @contextmanager
    def _open(self, stripes: int, first: int) -> Iterator[Iterator[bytes | memoryview]]:
        yield self._leaves(stripes, first)

    def _leaves(self, stripes: int, first: int) -> Iterator[bytes | memoryview]:
        for index in range(first, self._tree.count, stripes):
            start, size = self._tree.span(index)
            with self._open_range(start, start + size - 1) as answer:
                if not (
                    (answer.status == 206 and answer.offset == start)
                    or (answer.status == 200 and start == 0 and size == self._tree.length)
                ):
                    raise RemoteError(
                        f"origin: asked for bytes {start}-{start + size - 1}, got status "
                        f"{answer.status} from {answer.offset}",
                        status=answer.status,
                    )
                yield from answer.iter_chunks(1 << 20)


class _Corrupt(IntegrityError):
    """A leaf from a stripe's source does not match the hash tree."""


@dataclass
class _Failed:
    exc: BaseException


@dataclass(frozen=True)
class _Leaf:
    index: int
    data: bytearray
    source: str


class StripedSources:
    """The engine's ``OpenStream`` over one chain of sources per stripe (module doc).

    ``chains[t]`` lists stripe ``t``'s sources in order, the origin last.
    ``on_corrupt(source, reason)`` is called for a source that sent a bad leaf;
    ``on_switch(source)`` each time a source takes over a stripe. :attr:`delivered`
    counts the checked bytes each source handed on.
    """

    def __init__(
        self,
        chains: Sequence[Sequence[StripeSource]],
        tree: Tree,
        image_id: str,
        *,
        on_corrupt: Callable[[str, str], None] = lambda _name, _reason: None,
        on_switch: Callable[[str], None] = lambda _name: None,
    ) -> None:
        if not MIN_STRIPES <= len(chains) <= MAX_STRIPES or not all(chains):
            raise UsageError(
                f"a striped fetch needs {MIN_STRIPES}-{MAX_STRIPES} stripes, each with a source"
            )
        self._chains = [list(c) for c in chains]
        self._at = [0] * len(chains)  # each stripe's current source
        self._verifier = TreeVerifier.from_tree(tree, image_id=image_id)
        self._tree = tree
        self._image_id = image_id
        self._on_corrupt = on_corrupt
        self._on_switch = on_switch
        self._lock = threading.Lock()
        self.failed: list[tuple[str, str]] = []  # (source, why) in order
        self.delivered: dict[str, int] = {}

    @property
    def stripes(self) -> int:
        return len(self._chains)

    @property
    def checker(self) -> TreeVerifier:
        """The verifier every leaf this hands on passed (in whichever stripe's thread):
        the engine's tree check follows it (``checked_by``), so no leaf is hashed twice."""
        return self._verifier

    def current(self, stripe: int) -> str:
        return self._chains[stripe][self._at[stripe]].name

    @property
    def main(self) -> str:
        """The source that delivered the most bytes (stripe 0's current one before any)."""
        with self._lock:
            if not self.delivered:
                return self.current(0)
            return max(self.delivered.items(), key=lambda kv: kv[1])[0]

    def __call__(self, offset: int, pool: BufferPool) -> AbstractContextManager[StreamLike]:
        return self._open(offset)

    @contextmanager
    def _open(self, offset: int) -> Iterator[StreamLike]:
        first = offset // self._tree.leaf_size
        stop = threading.Event()
        queues: list[queue.Queue[_Leaf | _Failed]] = [
            queue.Queue(maxsize=QUEUE_LEAVES) for _ in self._chains
        ]
        threads = [
            threading.Thread(
                target=self._read,
                args=(t, first, queues[t], stop),
                name=f"cowfleet-stripe-{t}",
                daemon=True,
            )
            for t in range(self.stripes)
        ]
        for th in threads:
            th.start()
        try:
            yield _Stream(self, offset, first, queues, threads)
        finally:
            stop.set()
            for q in queues:  # wake readers waiting on a full queue
                while True:
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        break
            for th in threads:
                th.join(timeout=_POLL)  # one blocked in a read ends at its stall timeout

    def _give_up(self, stripe: int, src: StripeSource, exc: BaseException) -> None:
        reason = str(exc)
        with self._lock:
            self.failed.append((src.name, reason))
        if isinstance(exc, _Corrupt):
            log.error(
                "image %s: %s sent a bad leaf of stripe %d: %s",
                self._image_id,
                src.name,
                stripe,
                reason,
            )
            self._on_corrupt(src.name, reason)
        else:
            log.warning(
                "image %s: stripe %d source %s failed: %s", self._image_id, stripe, src.name, reason
            )
        self._at[stripe] += 1
        self._on_switch(self.current(stripe))

    def _read(
        self, t: int, first: int, q: queue.Queue[_Leaf | _Failed], stop: threading.Event
    ) -> None:
        k, tree = self.stripes, self._tree
        index = first + (t - first) % k  # the first leaf of stripe t at or after ``first``

        def put(item: _Leaf | _Failed) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL)
                    return True
                except queue.Full:
                    continue
            return False

        while index < tree.count and not stop.is_set():
            src = self._chains[t][self._at[t]]
            try:
                with src.open(t, k, index) as body:
                    buf: bytearray | None = None
                    filled = 0
                    for chunk in body:
                        view = memoryview(chunk).cast("B")
                        done = 0
                        while done < len(view):
                            if index >= tree.count:
                                raise _Corrupt(f"{src.name}: more bytes than stripe {t} has")
                            size = tree.span(index)[1]
                            if buf is None:
                                buf, filled = bytearray(size), 0
                            n = min(size - filled, len(view) - done)
                            buf[filled : filled + n] = view[done : done + n]
                            filled, done = filled + n, done + n
                            if filled == size:
                                try:
                                    self._verifier.check_leaf(index, buf)
                                except IntegrityError as exc:
                                    raise _Corrupt(f"{src.name}: {exc}") from exc
                                if not put(_Leaf(index, buf, src.name)):
                                    return
                                buf = None
                                index += k
                        if stop.is_set():
                            return
                    if index < tree.count:
                        raise BackendUnavailableError(
                            f"{src.name}: stripe {t} ended before leaf {index}"
                        )
            except SWITCHABLE as exc:
                if stop.is_set():
                    return
                if not src.peer or self._at[t] + 1 >= len(self._chains[t]):
                    put(_Failed(exc))  # the last source: the engine's retries take over
                    return
                self._give_up(t, src, exc)
            except BaseException as exc:
                put(_Failed(exc))
                return


class _Stream:
    """What the engine reads: the stripes' checked leaves, in index order."""

    def __init__(
        self,
        owner: StripedSources,
        offset: int,
        first: int,
        queues: list[queue.Queue[_Leaf | _Failed]],
        threads: list[threading.Thread],
    ) -> None:
        self.status = 206 if offset else 200
        self.offset = offset
        self.total_size: int | None = owner._tree.length
        self._owner = owner
        self._first = first
        self._queues = queues
        self._threads = threads

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[memoryview]:
        owner = self._owner
        k = owner.stripes
        skip = self.offset - self._first * owner._tree.leaf_size
        for index in range(self._first, owner._tree.count):
            q = self._queues[index % k]
            while True:
                try:
                    item = q.get(timeout=_POLL)
                    break
                except queue.Empty:
                    if not self._threads[index % k].is_alive() and q.empty():
                        raise BackendUnavailableError(
                            f"image {owner._image_id}: stripe {index % k} stopped"
                        ) from None
            if isinstance(item, _Failed):
                raise item.exc
            if item.index != index:  # cannot happen: each reader goes in order
                raise RemoteError(f"stripe {index % k}: leaf {item.index} where {index} belongs")
            out = memoryview(item.data)[skip:] if skip else memoryview(item.data)
            skip = 0
            with owner._lock:
                owner.delivered[item.source] = owner.delivered.get(item.source, 0) + len(out)
            yield out
