"""Striped source plans: one tree per stripe, interiors disjoint, no cycle (sans-I/O).

Called by :func:`cowfleet.distribution.assign.assign_sources` with ``stripes=k >= 2``.
Leaf ``i`` of the image is in stripe ``i % k``. Each fetcher that does not hold the
image yet gets a *home* stripe, ``position % k`` over those fetchers (balanced). For
each stripe ``t`` there is one tree, built with the rules of the unstriped one (best
feeder with a free slot: complete holders, then the shallowest, then the fewest
children, then a hash of image and host), except:

- its interior (nodes with children) is made of home-``t`` fetchers and holders: every
  other fetcher is a leaf of tree ``t``. A home-``t`` fetcher has ``fanout`` slots in
  tree ``t`` only; a holder (complete, or fetching since an earlier batch) may feed any
  stripe and its ``fanout`` slots are shared by all the trees;
- the fetchers are placed once, in the order given, in every tree at once: a node's
  parents in *all* stripes were placed before it. This matters because a node lands
  leaves in order (its file is a prefix that peers stream from), so it forwards leaf
  ``i`` of its home stripe only once its other stripes brought it every leaf before
  ``i``. Were the trees placed each on its own (home fetchers first, the others after)
  the union of the trees would hold cycles (a feeds b stripe 0, b feeds a stripe 1),
  and with in-order landing each such cycle costs a whole round of leaf times per leaf:
  the fleet model (``bench/fleet_sim.py``) measured 20x one fetch that way;
- "shallowest" is the depth in that union: one more than the deepest parent of any
  stripe (a node's lag is that of its slowest stripe);
- the origin feeds every stripe to the first fetcher of a fresh image (one copy), and
  that fetcher then feeds every stripe, its ``fanout`` slots shared by the trees like a
  holder's (it is the only node with every stripe before the home fetchers are placed).

Only when the home-``t`` fetchers' slots run out (``fanout <= k`` leaves none to
spare, as capacity then just meets the demand; with ``k >= 3`` also near the top of a
fresh image's trees, before a home-``t`` fetcher is placed) does a leaf of tree ``t``
with a free slot feed others in it. With ``fanout == k`` the trees degenerate into chains (each new
node takes the one free slot): use ``fanout > k`` (the API's default is 3 for k=2,
``api_peer_stripe_fanout``): a node feeding its home stripe uploads ``fanout / k``
images per image, so each stripe runs at ``k / fanout`` of a link and the fleet takes
about ``fanout / k`` fetches plus a leaf's lag per level.

Each stripe's chain is the parent, then complete holders, the parent's ancestors in that
tree, and the nodes placed just before (as unstriped). Every one of them was placed
before the fetcher, so the sources of all stripes together form no cycle.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from cowfleet.distribution.assign import (
    ANCESTORS,
    HOLDERS,
    NEIGHBOURS,
    Holder,
    SourcePlan,
    spread,
)


@dataclass
class _Node:
    host: str
    complete: bool
    holder: bool  # a holder: feeds any stripe, slots shared across trees
    depth: int
    order: int  # place in this tree
    parent: str | None
    home: int | None = None  # a fetcher's home stripe
    children: int = 0  # in this tree


class _Tree:
    """One stripe's tree as it is built."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id
        self.nodes: dict[str, _Node] = {}
        self.placed: list[str] = []
        self.interior: list[tuple[tuple[bool, int, int, bytes], int, str]] = []
        self.spare: list[tuple[tuple[bool, int, int, bytes], int, str]] = []  # leaves
        self.rooted = False  # a node that may feed this stripe is in the tree

    def add(self, node: _Node, *, interior: bool, shared: dict[str, int]) -> None:
        self.rooted = self.rooted or interior
        self.nodes[node.host] = node
        self.placed.append(node.host)
        heapq.heappush(
            self.interior if interior else self.spare,
            (self.key(node, shared), node.order, node.host),
        )

    def key(self, n: _Node, shared: dict[str, int]) -> tuple[bool, int, int, bytes]:
        used = shared[n.host] if n.holder else n.children
        return (not n.complete, n.depth, used, spread(self.image_id, n.host))


def _pick(
    tree: _Tree,
    heap: list[tuple[tuple[bool, int, int, bytes], int, str]],
    me: _Node | None,
    host: str,
    shared: dict[str, int],
    fanout: int,
) -> _Node | None:
    """Pop the best node of ``heap`` with a free slot that may feed ``host``."""
    skipped = []
    found: _Node | None = None
    while heap:
        key, order, name = heapq.heappop(heap)
        n = tree.nodes[name]
        used = shared[name] if n.holder else n.children
        if key != tree.key(n, shared) or used >= fanout:
            continue  # stale, or full
        if name == host or (me is not None and order > me.order):
            skipped.append((key, order, name))
            continue
        found = n
        break
    for item in skipped:
        heapq.heappush(heap, item)
    return found


def assign_striped(
    image_id: str,
    fetchers: Sequence[str],
    holders: Sequence[Holder],
    *,
    fanout: int,
    stripes: int,
) -> dict[str, SourcePlan]:
    """The striped plan of each fetcher (see the module doc)."""
    k = stripes
    known: dict[str, Holder] = {}
    for h in holders:
        old = known.get(h.host)
        if old is not None and (old.complete or not h.complete):
            continue
        known[h.host] = h
    shared = dict.fromkeys(known, 0)  # children of each holder, all trees together
    trees = [_Tree(image_id) for _ in range(k)]
    for tree in trees:
        for h in known.values():
            n = _Node(h.host, h.complete, True, 0 if h.complete else 1, len(tree.nodes), None)
            tree.add(n, interior=True, shared=shared)
    complete = sorted(
        (h.host for h in known.values() if h.complete), key=lambda x: spread(image_id, x)
    )
    plans: dict[str, SourcePlan] = {}
    pending: list[str] = []  # fetching since an earlier batch: a plan, no home
    new: list[str] = []
    seen: set[str] = set()
    for host in fetchers:
        if host in seen:
            continue
        seen.add(host)
        held = known.get(host)
        if held is None:
            new.append(host)
        elif held.complete:
            plans[host] = SourcePlan(host, ())
        else:
            pending.append(host)
    home = {host: i % k for i, host in enumerate(new)}
    chains: dict[str, list[tuple[str, ...]]] = {}
    for host in pending + new:
        parents: list[_Node | None] = []
        for t, tree in enumerate(trees):
            p = _parent(tree, t, host, shared, fanout)
            parents.append(p)
            if p is not None and p.holder and shared[p.host] < fanout:
                for other in trees:  # its shared count changed: a fresh key in every tree
                    n = other.nodes[p.host]
                    heapq.heappush(other.interior, (other.key(n, shared), n.order, n.host))
        # Its depth: the deepest of its parents, plus one (the origin is at 0). A node
        # lands leaves in order, so it forwards a leaf only once every stripe has
        # brought it the leaves before: its lag is that of its slowest stripe.
        depth = 1 + max((p.depth if p is not None else 0) for p in parents)
        # The origin's one copy: a new fetcher fed every stripe by the origin (the first
        # of a fresh image) feeds every stripe in turn, its slots shared as a holder's.
        hub = host in home and all(p is None for p in parents)
        if hub:
            shared[host] = 0
        chains[host] = [
            _join(tree, t, host, home.get(host), parents[t], depth, shared, complete, hub)
            for t, tree in enumerate(trees)
        ]
    for host, per in chains.items():
        plans[host] = SourcePlan(host, per[0], tuple(per), home.get(host))
    return {h: plans[h] for h in fetchers if h in plans}


def _parent(tree: _Tree, t: int, host: str, shared: dict[str, int], fanout: int) -> _Node | None:
    """Take a slot for ``host`` in stripe ``t``'s tree: its parent (None: the origin)."""
    me = tree.nodes.get(host)  # a holder fetching since an earlier batch
    parent = _pick(tree, tree.interior, me, host, shared, fanout)
    if parent is None and tree.rooted:
        parent = _pick(tree, tree.spare, me, host, shared, fanout)  # slots ran out
    return parent if parent is None else _take(tree, t, parent, shared, fanout)


def _take(tree: _Tree, t: int, parent: _Node, shared: dict[str, int], fanout: int) -> _Node:
    parent.children += 1
    if parent.holder:
        shared[parent.host] += 1
    elif parent.children < fanout:
        heap = tree.interior if parent.home == t else tree.spare
        heapq.heappush(heap, (tree.key(parent, shared), parent.order, parent.host))
    return parent


def _join(
    tree: _Tree,
    t: int,
    host: str,
    home: int | None,
    parent: _Node | None,
    depth: int,
    shared: dict[str, int],
    complete: list[str],
    hub: bool = False,
) -> tuple[str, ...]:
    """Add ``host`` to stripe ``t``'s tree under ``parent``: its chain for that stripe
    (``hub``: interior in every tree, with shared slots)."""
    up = parent.host if parent is not None else None
    me = tree.nodes.get(host)
    if me is None:
        me = _Node(host, False, hub, depth, len(tree.nodes), up, home)
        tree.add(me, interior=hub or home == t, shared=shared)
    else:
        me.depth, me.parent = depth, up
        heapq.heappush(tree.interior, (tree.key(me, shared), me.order, me.host))
    return _chain(tree, me, parent, complete)


def _chain(tree: _Tree, me: _Node, parent: _Node | None, complete: list[str]) -> tuple[str, ...]:
    if parent is None:
        return ()
    out = [parent.host]
    for c in complete:
        if len(out) > HOLDERS:
            break
        if c not in (me.host, parent.host):
            out.append(c)
    up, n = parent.parent, 0
    while up is not None and n < ANCESTORS:
        if up not in out and up != me.host:
            out.append(up)
            n += 1
        up = tree.nodes[up].parent
    n, i = 0, me.order - 1
    while i >= 0 and n < NEIGHBOURS:
        near = tree.placed[i]
        if near not in out and near != me.host:
            out.append(near)
            n += 1
        i -= 1
    return tuple(out)
