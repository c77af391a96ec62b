"""Benchmark: pre-cache one image onto N node agents through the compute API, with peers.

Everything real on loopback: the image service behind a :class:`CountingProxy` that caps
the origin's link (``--origin-mbs``, default 100 MB/s) and counts the bytes it passes
on, the compute API, N ``cowfleet serve node --driver none`` agents. Each case starts
fresh agents (empty caches) and its own proxy, then ``POST /cowfleet/precache`` (``all``
or ``hosts``) and watches the progress resource (``GET /cowfleet/precache/{id}``, every
0.25 s) until every node (every surviving node, in the faults case) is ``cached``; the
node reports ``cached`` only once its base is verified and installed. Afterwards every
base is read back and compared with the image (sha256).

Same run, same image:

* ``one``: one node alone from the origin (the time every ratio is given against); then
  a second node from that node as a complete peer, alone (the per-node throughput of
  this machine, and the CPU it costs: the inputs of the model check);
* ``herd``: N nodes from the origin at once (``api_peer_fanout=0``);
* ``nova``: one node at a time from the origin, as Nova's default
  (``api_precache_concurrency=1``, ``api_peer_fanout=0``);
* ``peers``: N nodes at once, sources assigned by the API with the product defaults
  (striped: ``api_peer_stripes`` 2, ``api_peer_stripe_fanout`` 3);
* ``tree``: as ``peers`` with one tree (``api_peer_stripes=1``, ``api_peer_fanout`` 2);
* ``faults``: as ``peers``, and once bytes flow from peers, three agents that other
  nodes are fetching from are killed with SIGKILL;
* ``floor``: no cowfleet at all: N concurrent plain transfers of the image file from a
  ``socket.sendfile`` server to ``curl | tee FILE`` and ``openssl dgst`` sha256 and sha512
  of every byte (what each node must check: the tree and the whole-image digest), then an fsync
  (:mod:`_floor`), uncapped: the least this machine needs to land and hash N copies,
  against which the ``peers`` time is read.

Then the model of :mod:`fleet_sim` is run with this run's parameters (N, the image
size, the origin cap, the measured per-node throughput) and its time for all nodes is
printed next to the real one. Targets of issue 16 (16 nodes, 512 MiB): origin bytes
<= 1.1 images and time <= 1.5x ``one`` for ``peers``; every survivor verified and origin
bytes <= 1.5 images for ``faults``; model within 25% of the real time.

    python3 bench/precache_peers.py [--nodes 16] [--size-mib 512] [--origin-mbs 100]
                                    [--cases one herd nova peers tree faults] [--kill 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))
from tests.fixtures.images import ImageService  # noqa: E402
from tests.fixtures.node_agent import CountingProxy  # noqa: E402

from _cache_common import MiB, load, make_image_file, workdir  # noqa: E402
from _fleet_common import ADMIN_TOKEN, Fleet, cpu_seconds  # noqa: E402
from _floor import Bounds, Floor, bounds, plain_transfers  # noqa: E402
from cowfleet.cache.layout import Layout  # noqa: E402
from cowfleet.hashtree import DEFAULT_LEAF_SIZE as LEAF  # noqa: E402
from fleet_sim import simulate, simulate_striped  # noqa: E402

CASES = ("one", "herd", "nova", "peers", "tree", "faults", "floor")
POLL = 0.25
CAPACITY = (4, 8192, 50)


@dataclass
class Outcome:
    seconds: float  # POST to the last (surviving) node cached
    origin_bytes: int
    nodes: dict[str, dict[str, Any]]  # host -> its last progress row
    peer_seen: set[str] = field(default_factory=set)  # peer hosts named while bytes flowed
    killed: list[str] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds of the agents during the run (the survivors')
    verified: int = 0  # bases read back equal to the image
    # host -> seconds after the POST at which the API first showed it with bytes, all
    # bytes in (verifying), cached (as polled every POLL s)
    timeline: dict[str, dict[str, float]] = field(default_factory=dict)


def _upload(images: ImageService, path: Path) -> str:
    from cowfleet.images.client import ImageClient

    with ImageClient(images.url, ADMIN_TOKEN, timeout=600) as c:
        img = c.create(
            name="precache-bench", disk_format="raw", container_format="bare", visibility="public"
        )
        with open(path, "rb") as fh:
            c.upload(img.id, fh, size=path.stat().st_size)
        return str(img.id)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _agent_pids(fleet: Fleet) -> list[int]:
    return [a.proc.pid for a in fleet.agents if a.proc is not None and a.proc.poll() is None]


def _cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds so far of each of ``pids`` still running."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_seconds(pid)
    return out


def precache(
    fleet: Fleet,
    image_id: str,
    size: int,
    want_digest: str,
    *,
    hosts: list[str] | None = None,
    kill: int = 0,
    timeout: float = 3600.0,
) -> Outcome:
    """One pre-cache through the API, watched until every (surviving) node is cached."""
    assert fleet.proxy is not None
    sent0 = fleet.proxy.bytes_sent(image_id)
    pids = _agent_pids(fleet)
    cpu0 = _cpu(pids)
    body: dict[str, Any] = {"image_id": image_id}
    if hosts is None:
        body["all"] = True
    else:
        body["hosts"] = hosts
    by_name = {a.hostname: a for a in fleet.agents}
    killed: list[str] = []
    peer_seen: set[str] = set()
    timeline: dict[str, dict[str, float]] = {}
    with fleet.client() as c:
        endpoint = fleet.apis[0].endpoint
        t0 = time.perf_counter()
        r = c.post(f"{endpoint}/cowfleet/precache", json=body)
        if r.status_code != 202:
            raise SystemExit(f"pre-cache answered {r.status_code}: {r.text}")
        pid = r.json()["precache"]["id"]
        while True:
            doc = c.get(f"{endpoint}/cowfleet/precache/{pid}").json()["precache"]
            now = time.perf_counter() - t0
            nodes = {n["host"]: n for n in doc["nodes"]}
            for n in nodes.values():
                marks = timeline.setdefault(n["host"], {})
                if n["bytes_done"]:
                    marks.setdefault("bytes", now)
                if n["state"] in ("verifying", "cached"):
                    marks.setdefault("all in", now)
                if n["state"] == "cached":
                    marks.setdefault("cached", now)
            serving: list[str] = []
            for n in nodes.values():
                src = n["source"]
                if n["state"] in ("fetching", "verifying") and src and src != "origin":
                    peer_seen.add(src)
                    if src not in serving and src not in killed:
                        serving.append(src)
            if kill and len(killed) < kill:
                flowing = [
                    n for n in nodes.values()
                    if n["source"] not in (None, "origin") and n["bytes_done"] >= size // 8
                ]  # fmt: skip
                if flowing and serving:
                    for host in serving[: kill - len(killed)]:
                        agent = by_name[host]
                        if agent.proc is not None:
                            agent.proc.kill()  # SIGKILL, mid-transfer
                            agent.proc.wait()
                            killed.append(host)
                            print(
                                f"  killed {host} at {now:.1f} s (it was feeding: "
                                f"{sorted(h for h, n in nodes.items() if n['source'] == host)})",
                                flush=True,
                            )
            alive = [h for h in nodes if h not in killed]
            if all(nodes[h]["state"] == "cached" for h in alive):
                seconds = now
                break
            if doc["state"] != "running" and any(nodes[h]["state"] != "cached" for h in alive):
                bad = {h: (nodes[h]["state"], nodes[h]["error"]) for h in alive}
                raise SystemExit(f"pre-cache ended with nodes not cached: {bad}")
            if now > timeout:
                raise SystemExit(f"pre-cache not done in {timeout:.0f} s: {doc}")
            time.sleep(POLL)
    cpu = sum(v - cpu0[pid] for pid, v in _cpu(pids).items() if pid in cpu0)  # survivors
    origin = fleet.proxy.bytes_sent(image_id) - sent0
    verified = 0
    for host in alive:
        path = Layout(by_name[host].instances).paths(image_id).base
        if path.is_file() and path.stat().st_size == size and _digest(path) == want_digest:
            verified += 1
        else:
            print(f"  WARNING: the base on {host} is not the image: {path}", flush=True)
    return Outcome(seconds, origin, nodes, peer_seen, killed, cpu, verified, timeline)


def start_fleet(
    root: Path,
    images: ImageService,
    tokens: Path,
    n: int,
    rate: float,
    settings: dict[str, str],
) -> Fleet:
    proxy = CountingProxy(images.url, rate=rate)
    fleet = Fleet(
        root, n, CAPACITY, api_settings={"COWFLEET_API_HEARTBEAT_INTERVAL": "1", **settings}
    )
    try:
        fleet.start(images, tokens, proxy)
    except BaseException:
        fleet.stop()
        proxy.close()
        raise
    return fleet


def stop_fleet(fleet: Fleet) -> None:
    fleet.stop()
    if fleet.proxy is not None:
        fleet.proxy.close()
    shutil.rmtree(fleet.root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--origin-mbs", type=float, default=100.0, help="origin cap, MB/s (1e6)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--kill", type=int, default=3, help="agents killed in the faults case")
    ap.add_argument("--dir", default=None, help="work directory parent (default: /tmp)")
    args = ap.parse_args()
    n, size, rate = args.nodes, args.size_mib * MiB, args.origin_mbs * 1e6
    work = workdir(args.dir)
    results: dict[str, Outcome] = {}
    peer_one: Outcome | None = None
    floor: Floor | None = None
    bound: Bounds | None = None
    load_before = load()
    started = time.perf_counter()
    try:
        images, tokens = Fleet.image_service(work)
        try:
            src = work / "image.raw"
            make_image_file(src, size)
            want = _digest(src)
            image_id = _upload(images, src)
            if "floor" in args.cases:
                print(f"[floor] {n} plain transfers at once ({load()})", flush=True)
                (work / "floor").mkdir()
                # The job's floor: what every node must do with the bytes (the tree's sha256
                # and the whole-image sha512), with no Python on the path.
                floor = plain_transfers(
                    src, [work / "floor" / f"{i}" for i in range(n)], whole_digest=True
                )
                if set(floor.digests) != {want}:
                    print(f"  WARNING: a plain transfer got other bytes: {floor.digests}")
                print(
                    f"[floor] {floor.seconds:.2f} s, CPU {floor.cpu:.0f} s ({load()})", flush=True
                )
                bound = bounds(src, [work / "floor" / f"{i}" for i in range(n)])
                print(
                    f"[floor] bounds: {n} fsynced copies at once {bound.disk:.2f} s "
                    f"({bound.disk_cpu:.1f} CPU s), hashing {bound.hashing:.2f} s ({load()})",
                    flush=True,
                )
            src.unlink()
            print(
                f"image {image_id}: {args.size_mib} MiB, origin capped at {args.origin_mbs:g} "
                f"MB/s; {os.cpu_count()} cores, {load_before}",
                flush=True,
            )
            plans: list[tuple[str, int, dict[str, str]]] = [
                ("one", 2, {}),
                ("herd", n, {"COWFLEET_API_PEER_FANOUT": "0"}),
                (
                    "nova",
                    n,
                    {"COWFLEET_API_PEER_FANOUT": "0", "COWFLEET_API_PRECACHE_CONCURRENCY": "1"},
                ),
                ("peers", n, {}),
                ("tree", n, {"COWFLEET_API_PEER_STRIPES": "1"}),
                ("faults", n, {}),
            ]
            for case, count, settings in plans:
                if case not in args.cases:
                    continue
                print(f"[{case}] starting {count} node agent(s) ({load()})", flush=True)
                fleet = start_fleet(work / case, images, tokens, count, rate, settings)
                try:
                    if case == "one":
                        first = fleet.agents[0].hostname
                        results["one"] = precache(fleet, image_id, size, want, hosts=[first])
                        # The API learns node-00 holds it from its next heartbeat.
                        time.sleep(2.5)
                        peer_one = precache(
                            fleet, image_id, size, want, hosts=[fleet.agents[1].hostname]
                        )
                        src1 = peer_one.nodes[fleet.agents[1].hostname]["source"]
                        if src1 != first:
                            print(f"  WARNING: the second node fetched from {src1}", flush=True)
                    else:
                        kill = args.kill if case == "faults" else 0
                        results[case] = precache(fleet, image_id, size, want, kill=kill)
                finally:
                    stop_fleet(fleet)
                got = results[case]
                print(
                    f"[{case}] {got.seconds:.2f} s, origin {got.origin_bytes / size:.2f} images, "
                    f"{got.verified} bases verified, agents' CPU {got.cpu:.0f} s ({load()})",
                    flush=True,
                )
        finally:
            images.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(
        args,
        n,
        size,
        rate,
        results,
        peer_one,
        load_before,
        time.perf_counter() - started,
        floor,
        bound,
    )
    return 0


def report(
    args: argparse.Namespace,
    n: int,
    size: int,
    rate: float,
    results: dict[str, Outcome],
    peer_one: Outcome | None,
    load_before: str,
    wall: float,
    floor: Floor | None = None,
    bound: Bounds | None = None,
) -> None:
    print()
    print(
        f"pre-cache of one {args.size_mib} MiB image onto {n} node agents on loopback, origin "
        f"capped at {args.origin_mbs:g} MB/s; {os.cpu_count()} cores; {load_before} before, "
        f"{load()} after; run took {wall:.0f} s"
    )
    one = results.get("one")
    base = one.seconds if one is not None else float("nan")

    def line(name: str, what: str, target: str = "") -> None:
        got = results.get(name)
        if got is None:
            return
        print(
            f"  {what:<44} {got.seconds:8.2f} s  {got.seconds / base:6.2f}x one  origin "
            f"{got.origin_bytes / size:5.2f} images  verified {got.verified}"
            f"/{len(got.nodes) - len(got.killed)}{target}"
        )

    line("one", "one node alone from the origin")
    line("herd", f"{n} nodes from the origin at once")
    line("nova", f"{n} nodes one at a time (Nova's default)")
    line("peers", f"{n} nodes, peers on (2 stripes)", "  (targets: <=1.5x, <=1.1 images)")
    line("tree", f"{n} nodes, peers on, one tree (no stripes)")
    line("faults", f"{n} nodes, peers on, {args.kill} sources killed", "  (target <=1.5 images)")
    peers = results.get("peers")
    if floor is not None:
        print(
            f"  {f'{n} plain transfers + sha256 + sha512 (floor)':<44} {floor.seconds:8.2f} s  "
            f"{floor.seconds / base:6.2f}x one  (the machine's floor: {floor.cpu:.1f} CPU s, "
            f"{floor.cpu_per_gib:.2f} CPU-s/GiB)"
        )
        if bound is not None:
            print(
                f"  {f'{n} copies written at once, fsynced (disk)':<44} {bound.disk:8.2f} s  "
                f"{bound.disk / base:6.2f}x one  (no network, no hashing)"
            )
            print(
                f"  {f'sha256 + sha512 of {n} copies / {os.cpu_count()} cores':<44} "
                f"{bound.hashing:8.2f} s  {bound.hashing / base:6.2f}x one  (one core: sha256 "
                f"{bound.sha256_mbs:.0f} MB/s, sha512 {bound.sha512_mbs:.0f} MB/s)"
            )
            print(
                f"  {'receive + hash + write, CPU over the cores':<44} {bound.cpu:8.2f} s  "
                f"{bound.cpu / base:6.2f}x one  (CPU s: sockets {bound.socket_cpu:.1f} + "
                f"hashing {bound.hashing * bound.cores:.1f} + fsynced copies "
                f"{bound.disk_cpu:.1f}; serving, inspection, bookkeeping not counted)"
            )
            target = 1.5 * base
            print(
                f"  lower bound max(disk, hashing, CPU of all three) = {bound.floor:.2f} s = "
                f"{bound.floor / base:.2f}x one: the 1.5x target ({target:.2f} s) is "
                + ("below" if bound.floor > target else "above")
                + " this machine's floor"
                + (
                    f"; peers / bound: {peers.seconds / bound.floor:.2f}x"
                    if peers is not None
                    else ""
                )
            )
        if peers is not None:
            print(
                f"  peers / floor: {peers.seconds / floor.seconds:.2f}x the time; peers' agents "
                f"{peers.cpu / (n * size / (1 << 30)):.2f} CPU-s per GiB landed"
            )
    if peers is not None:
        print("  peers timeline (s after the POST: first bytes / all bytes in / cached, source):")
        for host, marks in sorted(peers.timeline.items(), key=lambda kv: kv[1].get("cached", 0)):
            when = " / ".join(f"{marks[k]:5.2f}" if k in marks else "  -  " for k in
                              ("bytes", "all in", "cached"))  # fmt: skip
            print(f"    {host:<10} {when}  {peers.nodes[host]['source']}")
        herd, nova = results.get("herd"), results.get("nova")
        extra = []
        if herd is not None:
            extra.append(f"{herd.seconds / peers.seconds:.2f}x faster than herd")
        if nova is not None:
            extra.append(f"{nova.seconds / peers.seconds:.2f}x faster than nova")
        if extra:
            print(f"  peers: {', '.join(extra)}; peer sources seen: {len(peers.peer_seen)}")
    faults = results.get("faults")
    if faults is not None:
        print(f"  faults: killed {faults.killed}; peer sources seen {len(faults.peer_seen)}")
    if peer_one is None or one is None or peers is None:
        return
    # -- the model, with this run's parameters ----------------------------------------
    link = size / peer_one.seconds  # one node from one complete peer, alone
    used = peer_one.cpu / peer_one.seconds  # cores one such transfer keeps busy (both ends)
    cores = os.cpu_count() or 1
    # N transfers at once share the cores: each gets at most cores / (N * used) of its speed.
    shared = link * min(1.0, cores / (n * used))
    print(
        f"  measured: one node from a complete peer {peer_one.seconds:.2f} s "
        f"({link / 1e6:.0f} MB/s), {used:.2f} cores busy per transfer; peers run: "
        f"{peers.cpu:.0f} CPU s in {peers.seconds:.1f} s ({peers.cpu / peers.seconds:.2f} cores)"
    )
    tree = results.get("tree")
    # "link only": every node's link is one transfer's speed alone. "CPU share": the
    # links stay that, but each node receives at most its share of the cores (the
    # machine's limit with N transfers at once; loopback uploads are not).
    for label, per_node, down in (
        ("link only", link, None),
        ("links + CPU share", link, shared),
    ):
        # "peers": the product default, 2 stripes, 3 per stripe tree; "tree": fanout 2
        for case, real, (finish, egress, _) in (
            ("peers", peers, simulate_striped(n, size, per_node, rate, 3, 2, 0.002, LEAF, down)),
            ("tree", tree, simulate(n, size, per_node, rate, 2, 0.002, LEAF, down)),
        ):
            if real is None:
                continue
            model = max(finish)
            print(
                f"  model of {case} ({label}: link {per_node / 1e6:.0f} MB/s, receive "
                f"{(down or per_node) / 1e6:.0f} MB/s, origin "
                f"{rate / 1e6:.0f} MB/s): all done {model:.2f} s, p50 "
                f"{statistics.median(finish):.2f} s, egress {egress:g}; real "
                f"{real.seconds:.2f} s; real/model {real.seconds / model:.2f} (target 0.8-1.25)"
            )


if __name__ == "__main__":
    raise SystemExit(main())
