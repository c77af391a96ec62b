"""Striped source plans: one tree per stripe, interiors disjoint (sans-I/O).

Called by :func:`cowfleet.distribution.assign.assign_sources` with ``stripes=k >= 2``.
Leaf ``i`` of the image is in stripe ``i % k``. Each fetcher that does not hold the
image yet gets a *home* stripe, ``position % k`` over those fetchers (balanced). For
each stripe ``t`` there is one tree, built with the same rules as the unstriped one
(best feeder with a free slot: complete holders, then the shallowest, then the fewest
children, then a hash of image and host), except:

- its interior (nodes with children) is made of home-``t`` fetchers and holders: every
  other fetcher is a leaf of tree ``t``. A home-``t`` fetcher has ``fanout`` slots in
  tree ``t`` only; a holder (complete, or fetching since an earlier batch) may feed any
  stripe and its ``fanout`` slots are shared by all the trees;
- the home-``t`` fetchers of a batch are placed first in tree ``t`` (in the order given),
  then the others, so the root of tree ``t`` is a home-``t`` fetcher and the tree is as
  shallow as the unstriped one;
- the origin roots each tree (one slot per stripe): for a fresh image it sends each
  stripe once, that is one image in all.

Only when the home-``t`` fetchers' slots run out (``fanout < k``, or a batch with fewer
home-``t`` fetchers than the others need) does a leaf of tree ``t`` with a free slot feed
others in it. The trees are placed together, one fetcher in each tree at a time, so the
holders' shared slots are spread over the stripes.

Each stripe's chain is the parent, then complete holders, the parent's ancestors in that
tree, and the nodes placed just before in that tree (as unstriped). Every one of them
was placed before the fetcher in that tree, so no stripe's sources form a cycle. A node
forwards leaf ``i`` only once it holds every leaf before it (downloads land in order),
so across stripes a wait is always for a lower leaf index: no deadlock either.
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
    _spread,
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
        self.origin_used = False

    def add(self, node: _Node, *, interior: bool, shared: dict[str, int]) -> None:
        self.nodes[node.host] = node
        self.placed.append(node.host)
        heapq.heappush(
            self.interior if interior else self.spare,
            (self.key(node, shared), node.order, node.host),
        )

    def key(self, n: _Node, shared: dict[str, int]) -> tuple[bool, int, int, bytes]:
        used = shared[n.host] if n.holder else n.children
        return (not n.complete, n.depth, used, _spread(self.image_id, n.host))


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
        (h.host for h in known.values() if h.complete), key=lambda x: _spread(image_id, x)
    )
    plans: dict[str, SourcePlan] = {}
    pending: list[str] = []  # fetching since an earlier batch: a plan, no home
    new: list[str] = []
    seen: set[str] = set()
    for host in fetchers:
        if host in seen:
            continue
        seen.add(host)
        h = known.get(host)
        if h is not None and h.complete:
            plans[host] = SourcePlan(host, ())
        elif h is not None:
            pending.append(host)
        else:
            new.append(host)
    home = {host: i % k for i, host in enumerate(new)}
    orders = [
        pending + [x for x in new if home[x] == t] + [x for x in new if home[x] != t]
        for t in range(k)
    ]
    chains: dict[str, list[tuple[str, ...]]] = {x: [()] * k for x in pending + new}
    for pos in range(len(pending) + len(new)):
        for t, tree in enumerate(trees):
            host = orders[t][pos]
            chains[host][t], fed_by = _place(
                tree, t, host, home.get(host), shared, fanout, complete
            )
            if fed_by is not None and shared[fed_by] < fanout:
                for other in trees:  # its shared count changed: a fresh key in every tree
                    n = other.nodes[fed_by]
                    heapq.heappush(other.interior, (other.key(n, shared), n.order, n.host))
    for host, per in chains.items():
        plans[host] = SourcePlan(host, per[0], tuple(per), home.get(host))
    return {h: plans[h] for h in fetchers if h in plans}


def _place(
    tree: _Tree,
    t: int,
    host: str,
    home: int | None,
    shared: dict[str, int],
    fanout: int,
    complete: list[str],
) -> tuple[tuple[str, ...], str | None]:
    """Place ``host`` in stripe ``t``'s tree: its chain of sources for that stripe, and
    the holder that feeds it (None: a fetcher or the origin does)."""
    me = tree.nodes.get(host)  # a holder fetching since an earlier batch
    parent = _pick(tree, tree.interior, me, host, shared, fanout)
    if parent is None and (tree.origin_used or me is not None):
        parent = _pick(tree, tree.spare, me, host, shared, fanout)  # slots ran out
    if parent is not None:
        parent.children += 1
        if parent.holder:
            shared[parent.host] += 1
        used = shared[parent.host] if parent.holder else parent.children
        if used < fanout and not parent.holder:
            heap = tree.interior if parent.home == t else tree.spare
            heapq.heappush(heap, (tree.key(parent, shared), parent.order, parent.host))
        depth = parent.depth + 1
    else:
        tree.origin_used = True
        depth = 1
    up = parent.host if parent is not None else None
    if me is None:
        me = _Node(host, False, False, depth, len(tree.nodes), up, home)
        tree.add(me, interior=home == t, shared=shared)
    else:
        me.depth, me.parent = depth, up
        heapq.heappush(tree.interior, (tree.key(me, shared), me.order, me.host))
    fed_by = parent.host if parent is not None and parent.holder else None
    return _chain(tree, me, parent, complete), fed_by


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
