"""Benchmark: one image to N real node agents on loopback, with and without peers.

Same run, same image service, same image, the origin capped by a throttling proxy
(``--origin-mbs``, default 100 MB/s), fresh node agents for each case:

* baseline 1: one node fetching from the origin alone (time from ``PUT`` to ACTIVE);
* baseline 2: N nodes fetching from the origin at once;
* peers: N nodes built at once, each with the ``sources`` that
  :func:`cowfleet.distribution.assign.assign_sources` gives (``--fanout``, default 2),
  streaming through from nodes still downloading.

Reported: wall time until all N are ACTIVE (their bases verified), its ratio to
baseline 1, and the origin's egress in images (downloads, and bytes from the ranges
asked). Targets of issue 16 at 16 nodes: egress <= 1.1 images, time <= 1.5x baseline 1.

    python3 bench/peer_fetch.py [--nodes 4] [--size-mib 128] [--origin-mbs 100] [--fanout 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
from tests.fixtures.node_agent import CountingProxy, FakeController, NodeAgent  # noqa: E402

from _cache_common import MiB, image_service, load, make_image_file, upload, workdir  # noqa: E402
from cowfleet.distribution.assign import assign_sources  # noqa: E402

FLAVOR = {"name": "b1.tiny", "vcpus": 1, "ram_mb": 64, "root_gb": 0}


def _spec(image_id: str, sources: list[dict[str, str]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "uuid": str(uuid_mod.uuid4()),
        "name": "bench",
        "project_id": "bench",
        "image_id": image_id,
        "flavor": FLAVOR,
    }
    if sources:
        spec["sources"] = sources
    return spec


def _boot(builds: list[tuple[NodeAgent, dict[str, Any]]]) -> float:
    """PUT every build at once (in order); seconds until all are ACTIVE."""
    t0 = time.perf_counter()
    for agent, spec in builds:
        resp = agent.request("PUT", f"/v1/servers/{spec['uuid']}", json=spec, timeout=120)
        if resp.status_code != 202:
            raise SystemExit(f"PUT answered {resp.status_code}: {resp.text}")

    def wait(item: tuple[NodeAgent, dict[str, Any]]) -> None:
        item[0].wait_state(item[1]["uuid"], "ACTIVE", timeout=1800)

    with concurrent.futures.ThreadPoolExecutor(len(builds)) as pool:
        list(pool.map(wait, builds))
    return time.perf_counter() - t0


def _egress(proxy: CountingProxy, image_id: str, size: int) -> float:
    """Images' worth of bytes the origin was asked for (each range to the end)."""
    asked = 0
    for r in proxy.ranges.get(image_id, []):
        start = int(r.split("=")[1].split("-")[0]) if r else 0
        asked += size - start
    return asked / size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--origin-mbs", type=float, default=100.0)
    ap.add_argument("--fanout", type=int, default=2)
    ap.add_argument("--dir", default=None, help="work directory parent (default: /tmp)")
    args = ap.parse_args()
    work = workdir(args.dir)
    size = args.size_mib * MiB
    agents: list[NodeAgent] = []
    try:
        with image_service(work) as svc:
            src = work / "image.raw"
            make_image_file(src, size)
            image_id = upload(svc, src)
            src.unlink()
            proxies: list[CountingProxy] = []
            controller = FakeController(svc.token, interval=1.0)
            next_ip = iter(range(2, 250))

            def fleet(n: int, tag: str) -> tuple[list[NodeAgent], CountingProxy]:
                proxy = CountingProxy(svc.url, rate=args.origin_mbs * 1e6)
                proxies.append(proxy)
                out = []
                for i in range(n):
                    agent = NodeAgent(
                        work / f"{tag}-{i}",
                        api_url=controller.url,
                        image_url=proxy.url,
                        token_file=svc.token_file,
                        host=f"127.0.0.{next(next_ip)}",
                        hostname=f"{tag}-{i}",
                    )
                    agent.start()
                    agents.append(agent)
                    out.append(agent)
                return out, proxy

            try:
                (lone,), _p1 = fleet(1, "one")
                one = _boot([(lone, _spec(image_id))])
                herd_nodes, p2 = fleet(args.nodes, "herd")
                herd = _boot([(a, _spec(image_id)) for a in herd_nodes])
                peer_nodes, p3 = fleet(args.nodes, "peer")
                by_name = {a.hostname: a for a in peer_nodes}
                plans = assign_sources(image_id, list(by_name), [], fanout=args.fanout)
                builds = []
                for name, plan in plans.items():
                    sources = [{"host": p, "url": by_name[p].url} for p in plan.peers]
                    builds.append((by_name[name], _spec(image_id, sources)))
                peers = _boot(builds)
            finally:
                for agent in agents:
                    agent.stop()
                controller.close()
                for p in proxies:
                    p.close()
        n = args.nodes
        print(
            f"{n} node agents on loopback, one {args.size_mib} MiB image, origin capped at "
            f"{args.origin_mbs:g} MB/s, fanout {args.fanout}; cores {os.cpu_count()}, {load()}"
        )
        print(f"baseline 1, one node from the origin alone: {one:.2f} s")
        print(
            f"baseline 2, {n} nodes from the origin at once: {herd:.2f} s ({herd / one:.2f}x), "
            f"origin egress {_egress(p2, image_id, size):.2f} images ({p2.count(image_id)} "
            "downloads)"
        )
        print(
            f"peers, {n} nodes at once: {peers:.2f} s ({peers / one:.2f}x baseline 1, "
            f"{peers / herd:.2f}x baseline 2), origin egress "
            f"{_egress(p3, image_id, size):.2f} images ({p3.count(image_id)} downloads)"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
