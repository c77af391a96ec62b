"""Which source each node fetching an image takes: a tree of bounded fan-out (sans-I/O).

:func:`assign_sources` is pure and deterministic: the same arguments give the same plan.
Every node already holding the image (a :class:`Holder`; ``complete`` when it is cached
and verified, else it is fetching it now and serves what has landed) and every fetcher
once it is assigned can feed others. The fetchers are placed in the order given (the
order in which they started, for the API); each takes as its *parent* the feeding node
with a free slot that is best, in this order:

1. a complete holder (it serves at full speed);
2. a node still fetching, the closest to the origin first (fewest hops), so the tree
   stays shallow and each hop adds only a leaf's worth of lag ("streaming through");
3. fewer children so far; then a hash of the image id and the host, which spreads the
   load of different images over different holders, yet stays deterministic.

Each feeding node has ``fanout`` slots: it feeds at most ``fanout`` fetchers. The origin
(the image service) has one slot, used only when nothing else can feed the first
fetcher: with streaming through, one copy from the origin feeds the whole fleet. As each
assigned fetcher brings ``fanout`` slots of its own, a parent is always found.

A plan lists the parent first, then up to :data:`BACKUPS` fallbacks: other complete
holders (at most two), the parent's own ancestors (at most two), then the nodes placed
just before the fetcher (at most two, nearest first). None is ever placed after the
fetcher, so a fallback is never a node that is itself waiting on this one and the
sources form no cycle. The last group matters when a subtree's top dies: its children
lose their parent and its ancestors at once, and rather than each going to the origin
they fall back on a node placed before them, of which only the first goes to the
origin and the others stream from it. The origin is not named: it is always the last
resort, after every peer. A fetcher that is a complete holder already gets an empty plan.

**Stripes** (``stripes=k``, k >= 2; SplitStream-style): leaf ``i`` of the image belongs
to stripe ``i % k`` and each stripe travels down a tree of its own
(:mod:`cowfleet.distribution.stripes`). In one tree of fan-out ``f`` every node below the
root receives at ``1/f`` of a link; with k trees whose interiors are disjoint, a node
forwards only its *home* stripe, to ``f`` children, so it uploads ``f / k`` images per
image and receives at ``k / f`` of a link (2/3 for k=2, f=3, against 1/2 unstriped).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

HOLDERS, ANCESTORS, NEIGHBOURS = 2, 2, 2  # fallbacks of each kind, at most
BACKUPS = HOLDERS + ANCESTORS + NEIGHBOURS


@dataclass(frozen=True)
class Holder:
    host: str
    url: str
    complete: bool  # complete: cached+verified; False: fetching now


@dataclass(frozen=True)
class SourcePlan:
    host: str
    peers: tuple[str, ...]  # peer hostnames in order; the origin is always the last resort
    # With stripes (k >= 2): the sources of each stripe in order (same rules as peers;
    # empty: the origin), and the stripe whose tree this node may feed. ``peers`` is
    # then stripe 0's chain, a whole single tree for a node that does not stripe.
    stripes: tuple[tuple[str, ...], ...] = ()
    home: int | None = None


@dataclass
class _Feeder:
    host: str
    complete: bool
    depth: int  # hops from the origin (complete holders: 0)
    order: int  # when it joined (holders first, then fetchers as placed)
    parent: str | None
    children: int = 0


def spread(image_id: str, host: str) -> bytes:
    """The last tie-break between feeders: different images favour different holders,
    yet the same arguments always give the same order (shared by the striped plans)."""
    return hashlib.sha256(f"{image_id}\0{host}".encode()).digest()


def _key(image_id: str, f: _Feeder) -> tuple[bool, int, int, bytes]:
    return (not f.complete, f.depth, f.children, spread(image_id, f.host))


MAX_STRIPES = 8


def assign_sources(
    image_id: str,
    fetchers: Sequence[str],
    holders: Sequence[Holder],
    *,
    fanout: int,
    stripes: int = 1,
) -> dict[str, SourcePlan]:
    """The plan of each fetcher (see the module doc). ``fanout`` must be at least 1,
    ``stripes`` between 1 and :data:`MAX_STRIPES`."""
    if isinstance(fanout, bool) or not isinstance(fanout, int) or fanout < 1:
        raise ValueError(f"fanout must be a whole number >= 1, not {fanout!r}")
    if isinstance(stripes, bool) or not isinstance(stripes, int) or not 1 <= stripes <= MAX_STRIPES:
        raise ValueError(f"stripes must be a whole number 1-{MAX_STRIPES}, not {stripes!r}")
    if stripes > 1:
        from cowfleet.distribution.stripes import assign_striped

        return assign_striped(image_id, fetchers, holders, fanout=fanout, stripes=stripes)
    feeders: dict[str, _Feeder] = {}
    for h in holders:
        old = feeders.get(h.host)
        if old is not None and (old.complete or not h.complete):
            continue  # a host listed twice: complete wins
        feeders[h.host] = _Feeder(h.host, h.complete, 0 if h.complete else 1, len(feeders), None)
    complete = sorted(
        (f for f in feeders.values() if f.complete), key=lambda f: spread(image_id, f.host)
    )
    # Feeders with a free slot, best first; an entry whose key is stale is skipped.
    heap = [(_key(image_id, f), f.order, f.host) for f in feeders.values()]
    heapq.heapify(heap)
    plans: dict[str, SourcePlan] = {}
    placed: list[str | None] = [f.host for f in sorted(feeders.values(), key=lambda f: f.order)]
    for host in fetchers:
        if host in plans:
            continue
        me = feeders.get(host)
        if me is not None and me.complete:
            plans[host] = SourcePlan(host, ())
            continue
        parent: _Feeder | None = None
        skipped = []
        while heap:
            key, order, name = heapq.heappop(heap)
            f = feeders[name]
            if key != _key(image_id, f) or f.children >= fanout:
                continue  # stale, or full
            if name == host or (me is not None and order > me.order):
                skipped.append((key, order, name))  # not for this fetcher: keep it
                continue
            parent = f
            break
        for item in skipped:
            heapq.heappush(heap, item)
        if parent is not None:
            parent.children += 1
            if parent.children < fanout:
                heapq.heappush(heap, (_key(image_id, parent), parent.order, parent.host))
            depth = parent.depth + 1
        else:
            depth = 1  # no peer can feed it: the origin does (the first fetcher only)
        up = parent.host if parent is not None else None
        if me is None:
            me = feeders[host] = _Feeder(host, False, depth, len(feeders), up)
        else:  # already fetching (in-progress holder): keep its place, note its parent
            me.depth, me.parent = depth, up
        heapq.heappush(heap, (_key(image_id, me), me.order, me.host))
        while len(placed) <= me.order:
            placed.append(None)
        placed[me.order] = host
        plans[host] = SourcePlan(host, _chain(host, parent, feeders, complete, placed))
    return plans


def _chain(
    host: str,
    parent: _Feeder | None,
    feeders: dict[str, _Feeder],
    complete: list[_Feeder],
    placed: list[str | None],
) -> tuple[str, ...]:
    """The parent, then the fallbacks (see the module doc)."""
    if parent is None:
        return ()
    out = [parent.host]
    for f in complete:
        if len(out) > HOLDERS:
            break
        if f.host not in (host, parent.host):
            out.append(f.host)
    up, n = parent.parent, 0
    while up is not None and n < ANCESTORS:
        if up not in out and up != host:
            out.append(up)
            n += 1
        up = feeders[up].parent
    n, i = 0, feeders[host].order - 1
    while i >= 0 and n < NEIGHBOURS:
        near = placed[i]
        if near is not None and near not in out and near != host:
            out.append(near)
            n += 1
        i -= 1
    return tuple(out)
