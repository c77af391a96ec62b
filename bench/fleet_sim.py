"""Benchmark (model): one image to a whole fleet through the real source assignment.

A per-leaf event model of the fleet drives :func:`cowfleet.distribution.assign.assign_sources`
(the code the compute API runs) at 1,000 and 10,000 nodes and reports the time until
all nodes are done (p50, max) and the origin's egress in images. Same run, same model,
two baselines:

* one node fetching from the origin alone (the time every ratio is given against);
* every node fetching from the origin at once (what a fleet does without peers).

The model (stated, not measured): every node starts at t=0 (a pre-cache of the whole
fleet); each node takes its parent from the plan (the origin when it has none); a
parent's upload link is shared equally by its children (the origin's by the nodes it
feeds), a node's download is capped by its own link; the image is cut into hash-tree
leaves and a node receives leaf ``i`` only once its parent holds leaf ``i`` whole and
checked, and it has received leaf ``i - 1``; checking runs beside receiving (the
engine's threads), so it delays forwarding, not receiving:

    got[node][i]  = max(held[parent][i], got[node][i - 1]) + leaf / rate[node]
    held[node][i] = got[node][i] + hop

A node's receive rate is capped by its link, or by ``down`` when something else limits
it first: on one machine running every node agent (``bench/precache_peers.py``) the
cores are shared by every transfer at once, so each node receives at most
``cores / (N x cores one transfer keeps busy)`` of one transfer's speed, while its
upload (loopback) is not the limit.

``hop`` is the check of one leaf plus a round trip (default 2 ms: 4 MiB of sha256 at
about 2 GB/s). Shares do not change when a sibling finishes first (siblings have the
same rate, so they finish together), there is no packet loss or TCP ramp-up, and no
node fails.

With stripes (``--stripes k``, k >= 2, ``--stripe-fanout f`` children per stripe tree;
the product defaults are 2 and 3, see ``api_peer_stripes`` and ``api_peer_stripe_fanout``)
leaf ``i`` travels down stripe ``i % k``'s tree from the plan's
``stripes[i % k]`` parent. A node receives its k stripes as k flows, each capped at
``link / k`` (a flow left idle does not lend its share to the others), a parent's upload
is shared equally by every flow it feeds (children of all stripes together), the
origin's by the stripe flows it roots. A node forwards leaf ``i`` only once it holds it
checked *and* every leaf before it (the engine lands leaves in order):

    got[node][i]  = max(held[parent_t][i], got[node][i - k]) + leaf / rate[node, t]
    held[node][i] = max(got[node][i] + hop, held[node][i - 1])

The per-stripe readers' bounded queues (a stripe may run ahead of the slowest by a few
leaves only) are not modelled: with equal stripe rates they never fill. Each run also
prints the same-run baselines: the unstriped tree (``stripes 1``) and every node from
the origin at once.

    python3 bench/fleet_sim.py [--nodes 1000 10000] [--size-gib 1] [--link-gbit 10]
                               [--origin-gbit 10] [--fanout 2] [--stripes 2]
                               [--stripe-fanout 3] [--hop-ms 2] [--real-seconds T]

``--real-seconds T`` (with one ``--nodes``): the time a real run with these parameters
took (``bench/precache_peers.py`` prints it, and runs this model itself with the
throughput it measured); the model's time for all nodes is printed next to it with
their ratio (the issue asks for within 25%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from cowfleet.distribution.assign import assign_sources
from cowfleet.hashtree import DEFAULT_LEAF_SIZE

IMAGE = "00000000-0000-4000-8000-000000000001"
GIB = 1024**3


def simulate(
    n: int,
    size: int,
    link: float,
    origin: float,
    fanout: int,
    hop: float,
    leaf: int,
    down: float | None = None,
) -> tuple[list[float], float, float]:
    """(finish time of each node, origin egress in images, seconds spent assigning);
    ``down``: each node's receive cap when it is not its link (see the module doc)."""
    hosts = [f"node-{i:05d}" for i in range(n)]
    t0 = time.perf_counter()
    plans = assign_sources(IMAGE, hosts, [], fanout=fanout)
    assigning = time.perf_counter() - t0
    parent = {h: (plans[h].peers[0] if plans[h].peers else None) for h in hosts}
    children: dict[str | None, int] = {}
    for p in parent.values():
        children[p] = children.get(p, 0) + 1
    leaves = [leaf] * (size // leaf) + ([size % leaf] if size % leaf else [])
    done: dict[str, list[float]] = {}
    finish = []
    for h in hosts:  # the plan's order: a parent is always placed before its children
        p = parent[h]
        up = origin if p is None else link
        rate = min(link if down is None else down, up / children[p])
        got = 0.0
        held = []
        above = done[p] if p is not None else None
        for i, nbytes in enumerate(leaves):
            ready = above[i] if above is not None else 0.0
            got = max(ready, got) + nbytes / rate
            held.append(got + hop)
        done[h] = held
        finish.append(held[-1])
    return finish, float(children.get(None, 0)), assigning


def simulate_striped(
    n: int,
    size: int,
    link: float,
    origin: float,
    fanout: int,
    stripes: int,
    hop: float,
    leaf: int,
    down: float | None = None,
) -> tuple[list[float], float, float]:
    """As :func:`simulate`, with ``stripes`` trees (see the module doc)."""
    cap = link if down is None else down
    k = stripes
    hosts = [f"node-{i:05d}" for i in range(n)]
    t0 = time.perf_counter()
    plans = assign_sources(IMAGE, hosts, [], fanout=fanout, stripes=k)
    assigning = time.perf_counter() - t0
    idx = {h: j for j, h in enumerate(hosts)}
    parent = [[-1] * n for _ in range(k)]  # per stripe, per node: parent index (-1: origin)
    flows: dict[int, int] = {}  # feeder index (-1: origin) -> stripe flows it feeds
    for j, h in enumerate(hosts):
        for t in range(k):
            chain = plans[h].stripes[t]
            p = idx[chain[0]] if chain else -1
            parent[t][j] = p
            flows[p] = flows.get(p, 0) + 1
    rate = [
        [min(cap / k, (origin if p < 0 else link) / flows[p]) for p in parent[t]] for t in range(k)
    ]
    # A topological order of each tree (parents first), from its roots down.
    order: list[list[int]] = []
    for t in range(k):
        kids: dict[int, list[int]] = {}
        for j, p in enumerate(parent[t]):
            kids.setdefault(p, []).append(j)
        seq, stack = [], list(reversed(kids.get(-1, [])))
        while stack:
            j = stack.pop()
            seq.append(j)
            stack.extend(reversed(kids.get(j, [])))
        assert len(seq) == n, "a stripe tree does not reach every node"
        order.append(seq)
    count = -(-size // leaf)
    sizes = [leaf] * (size // leaf) + ([size % leaf] if size % leaf else [])
    got_last = [[0.0] * n for _ in range(k)]  # per stripe: when the last leaf arrived
    held_prev = [0.0] * n  # held[node][i - 1]
    held_now = [0.0] * n
    for i in range(count):
        t = i % k
        par, rt, last = parent[t], rate[t], got_last[t]
        nbytes = sizes[i]
        for j in order[t]:
            p = par[j]
            ready = held_now[p] if p >= 0 else 0.0
            got = max(ready, last[j]) + nbytes / rt[j]
            last[j] = got
            held_now[j] = max(got + hop, held_prev[j])
        held_prev, held_now = held_now, held_prev
    egress = flows.get(-1, 0) / k
    return list(held_prev), egress, assigning


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--link-gbit", type=float, default=10.0)
    ap.add_argument("--origin-gbit", type=float, default=10.0)
    ap.add_argument("--fanout", type=int, default=2)
    ap.add_argument("--stripes", type=int, default=2)
    ap.add_argument("--stripe-fanout", type=int, default=3)
    ap.add_argument("--hop-ms", type=float, default=2.0)
    ap.add_argument("--real-seconds", type=float, default=None)
    args = ap.parse_args()
    if args.real_seconds is not None and len(args.nodes) != 1:
        ap.error("--real-seconds compares one run: give one --nodes")
    size = int(args.size_gib * GIB)
    link = args.link_gbit * 1e9 / 8
    origin = args.origin_gbit * 1e9 / 8
    hop = args.hop_ms / 1000
    one = size / min(link, origin)  # baseline 1: one node from the origin alone
    print(
        f"image {size / GIB:g} GiB, links {args.link_gbit:g} Gbit/s, origin "
        f"{args.origin_gbit:g} Gbit/s, fanout {args.fanout} (striped: {args.stripes} "
        f"stripes, fan-out {args.stripe_fanout} per stripe tree), leaf "
        f"{DEFAULT_LEAF_SIZE // 1024**2} MiB, hop {args.hop_ms:g} ms"
    )
    print(f"baseline, one node from the origin alone: {one:.3f} s")
    for n in args.nodes:
        runs = [(1, simulate(n, size, link, origin, args.fanout, hop, DEFAULT_LEAF_SIZE))]
        if args.stripes > 1:
            striped = simulate_striped(
                n, size, link, origin, args.stripe_fanout, args.stripes, hop, DEFAULT_LEAF_SIZE
            )
            runs.insert(0, (args.stripes, striped))
        for k, (finish, egress, assigning) in runs:
            p50, worst = statistics.median(finish), max(finish)
            print(
                f"{n:6d} nodes, stripes {k}: p50 {p50:.3f} s ({p50 / one:.2f}x one fetch), "
                f"max {worst:.3f} s ({worst / one:.2f}x), origin egress {egress:g} image(s); "
                f"assign_sources took {assigning:.2f} s"
            )
        herd = n * size / origin  # baseline 2: all from the origin at once (shared link)
        print(
            f"{n:6d} nodes, all from the origin at once: {herd:.1f} s ({herd / one:.0f}x), "
            f"egress {n} images"
        )
        finish, egress, assigning = runs[0][1]
        worst = max(finish)
        if args.real_seconds is not None:
            print(
                f"real run: {args.real_seconds:.3f} s; model (all done) {worst:.3f} s; "
                f"real/model {args.real_seconds / worst:.2f} (within 25%: "
                f"{'yes' if 0.8 <= args.real_seconds / worst <= 1.25 else 'no'})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
