"""What a node's cache needs to fetch from peers and to let peers read its downloads.

:class:`Peering` is given to :class:`cowfleet.cache.ImageCache` by the node agent
(``cowfleet serve node``); without it the cache fetches from the origin only, as
``cowfleet cache fetch`` does. With it, every fetch of an image that publishes a hash
tree goes through :class:`cowfleet.fetch.sources.Sources` (the peers the request
names, then the origin), is verified with the tree *and* the whole-image digest, and
is registered in :attr:`Peering.live` so that other nodes can stream it as it lands.

:class:`BadPeers` remembers, per image, the peers that sent a piece that did not match
the tree: they are not asked for that image again by this node (until it restarts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from cowfleet.cache.live import LiveFetches
from cowfleet.fetch.sources import OriginSource, Peer, PeerSource, Source
from cowfleet.images.transport import DataTransport

DEFAULT_STALL = 10.0

# (peer host, image id, reason): how a bad piece is reported (the node agent tells the API).
Reporter = Callable[[str, str, str], None]


class BadPeers:
    """Peers caught sending bad pieces, per image (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bad: dict[str, set[str]] = {}

    def add(self, image_id: str, host: str) -> None:
        with self._lock:
            self._bad.setdefault(image_id, set()).add(host)

    def has(self, image_id: str, host: str) -> bool:
        with self._lock:
            return host in self._bad.get(image_id, ())


@dataclass
class Peering:
    token: str  # the node token, sent to peers
    stall: float = DEFAULT_STALL  # seconds without a byte before a peer is given up
    live: LiveFetches = field(default_factory=LiveFetches)
    bad: BadPeers = field(default_factory=BadPeers)
    report: Reporter = lambda _host, _image, _reason: None
    host: str = ""  # this node's hostname: never its own peer
    _client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            # The image client's data transport: a piece is read with one readinto into
            # the fetch's pooled buffers (httpx's default transport parses 64 KiB events
            # and joins them, several times the CPU per byte).
            self._client = httpx.Client(
                trust_env=False, follow_redirects=False, transport=DataTransport()
            )
        return self._client

    def sources(self, image_id: str, peers: Sequence[Peer], origin: OriginSource) -> list[Source]:
        """The peers (not this node, none known bad for ``image_id``) in order, then
        the origin."""
        out: list[Source] = [
            PeerSource(p, image_id, self.token, self.client, stall=self.stall)
            for p in peers
            if p.host != self.host and not self.bad.has(image_id, p.host)
        ]
        out.append(origin)
        return out

    def corrupt(self, image_id: str) -> Callable[[str, str], None]:
        def on_corrupt(host: str, reason: str) -> None:
            self.bad.add(image_id, host)
            self.report(host, image_id, reason)

        return on_corrupt

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
