"""Building a node's striped fetch from the API's per-stripe peers (:mod:`cowfleet.fetch.stripes`).

Each stripe's chain is its peers in order (not this node, none known bad for the
image), then the origin, asked one leaf at a time by a bounded ``Range``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cowfleet.fetch.sources import Peer
from cowfleet.fetch.stripes import OriginStripes, PeerStripes, StripedSources, StripeSource
from cowfleet.hashtree import Tree

if TYPE_CHECKING:
    from cowfleet.cache.peering import Peering
    from cowfleet.images.client import ImageClient


def striped_sources(
    peering: Peering,
    client: ImageClient,
    image_id: str,
    tree: Tree,
    stripes: Sequence[Sequence[Peer]],
    *,
    on_switch: Callable[[str], None] = lambda _name: None,
) -> StripedSources:
    origin = OriginStripes(
        lambda first, last: client.open_download(image_id, offset=first, end=last), tree
    )
    chains: list[list[StripeSource]] = []
    for peers in stripes:
        chain: list[StripeSource] = [
            PeerStripes(p, image_id, tree, peering.token, peering.client, stall=peering.stall)
            for p in peers
            if p.host != peering.host and not peering.bad.has(image_id, p.host)
        ]
        chain.append(origin)
        chains.append(chain)
    return StripedSources(
        chains, tree, image_id, on_corrupt=peering.corrupt(image_id), on_switch=on_switch
    )
