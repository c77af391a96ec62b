"""Benchmark (and check): concurrent creates onto nodes with room for fewer never overcommit.

``--creates`` (400) concurrent ``POST /servers`` of m1.tiny (1 vCPU) onto ``--nodes`` (4)
real node agents (``none`` driver) offering ``--room`` (200) vCPUs in all, unevenly,
at a CPU allocation ratio of 1.0 (RAM and disk to spare). Run on:

* SQLite, one API;
* PostgreSQL (``COWFLEET_TEST_POSTGRES_URL``, as ``scripts/setup/postgres.sh`` exports
  it; a fresh schema, dropped afterwards), two API replicas: the clients alternate
  between them, and so do the node agents' heartbeats.

The invariant, asserted (exit 1 when broken): exactly ``room`` servers ACTIVE, the
rest ERROR with the fault "No valid host was found.", and on every node the sum of
the flavors of its servers within what it offers -- counted from the servers' hosts,
from the API's hypervisor usage, and from each node agent's own instance list.
Also printed: the time from the first create to every server settled, and the
create (POST) latency p50/p99.

    python3 bench/no_overcommit.py [--creates 400] [--nodes 4] [--room 200]
                                   [--backend sqlite|postgres|both]
    python3 bench/no_overcommit.py --quick      # 40 creates onto room for 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _cache_common import load
from _fleet_common import (
    ADMIN_TOKEN,
    CountingProxy,
    Fleet,
    ImageService,
    concurrent_posts,
    create_body,
    pct,
    shared_services,
)

NO_VALID_HOST = "No valid host was found."
TINY = {"vcpus": 1, "ram_mb": 512, "disk_gb": 1}


def room_split(room: int, nodes: int) -> list[int]:
    """``room`` vCPUs over ``nodes`` nodes, unevenly (1 : 2 : ... : n), summing to ``room``."""
    total = nodes * (nodes + 1) // 2
    sizes = [max(1, room * (i + 1) // total) for i in range(nodes)]
    sizes[-1] += room - sum(sizes)
    return sizes


def check(
    fleet: Fleet, servers: list[dict[str, Any]], sizes: dict[str, int], args: argparse.Namespace
) -> list[str]:
    """Every broken part of the invariant (empty: it holds)."""
    problems = []
    by_status: dict[str, int] = {}
    for s in servers:
        by_status[s["status"]] = by_status.get(s["status"], 0) + 1
    want = {"ACTIVE": args.room, "ERROR": args.creates - args.room}
    if len(servers) != args.creates or by_status != want:
        problems.append(f"{len(servers)} servers {by_status}, want {want}")
    for s in servers:
        if s["status"] == "ERROR" and not str(s.get("fault", {}).get("message", "")).startswith(
            NO_VALID_HOST
        ):
            problems.append(f"server {s['id']} ERROR for another reason: {s.get('fault')}")
            break
    used: dict[str, dict[str, int]] = {h: {"vcpus": 0, "ram_mb": 0, "disk_gb": 0} for h in sizes}
    for s in servers:
        if s["status"] == "ACTIVE":
            host = s["OS-EXT-SRV-ATTR:host"]
            f = s["flavor"]
            u = used.setdefault(host, {"vcpus": 0, "ram_mb": 0, "disk_gb": 0})
            u["vcpus"] += f["vcpus"]
            u["ram_mb"] += f["ram"]
            u["disk_gb"] += f["disk"]
    ram_mb = 1024 * 1024
    for host, u in used.items():
        offered = {"vcpus": sizes.get(host, 0), "ram_mb": ram_mb, "disk_gb": 100_000}
        for k, v in u.items():
            if v > offered[k]:
                problems.append(f"{host}: {k} {v} used > {offered[k]} offered")
    for hv in fleet.hypervisors():
        host = hv["hypervisor_hostname"]
        if hv["vcpus_used"] != used[host]["vcpus"] or hv["vcpus_used"] > hv["vcpus"]:
            problems.append(
                f"{host}: the API counts {hv['vcpus_used']} vCPUs used of {hv['vcpus']}, "
                f"its servers hold {used[host]['vcpus']}"
            )
    for agent in fleet.agents:
        on_node = [
            i
            for i in agent.request("GET", "/v1/servers").json()["servers"]
            if i["state"] == "ACTIVE"
        ]
        if len(on_node) > sizes[agent.hostname] or len(on_node) != used[agent.hostname]["vcpus"]:
            problems.append(
                f"{agent.hostname}: {len(on_node)} instances on the node agent, "
                f"{used[agent.hostname]['vcpus']} placed there by the API, "
                f"{sizes[agent.hostname]} offered"
            )
    return problems


def run(
    backend: str,
    work: Path,
    services: tuple[ImageService, Path, CountingProxy],
    image_id: str,
    args: argparse.Namespace,
) -> bool:
    database, replicas, base = None, 1, ""
    if backend == "postgres":
        from tests.fixtures.compute_api import pg_schema_url

        base = os.environ.get("COWFLEET_TEST_POSTGRES_URL", "")
        if not base:
            raise SystemExit(
                "COWFLEET_TEST_POSTGRES_URL is not set: source scripts/setup/postgres.sh"
            )
        database, replicas = pg_schema_url(base), 2
    split = room_split(args.room, args.nodes)
    fleet = Fleet(
        work / backend,
        args.nodes,
        (split[0], 1024 * 1024, 100_000),
        api_settings={"COWFLEET_API_CPU_ALLOCATION_RATIO": "1.0"},
        database=database,
        replicas=replicas,
        capacities=[(v, 1024 * 1024, 100_000) for v in split],
    )
    try:
        fleet.start(*services)
        sizes = {a.hostname: split[i] for i, a in enumerate(fleet.agents)}
        urls = [f"{fleet.apis[i % replicas].endpoint}/servers" for i in range(args.creates)]
        bodies = [create_body(f"oc-{i}", image_id) for i in range(args.creates)]
        t0 = time.perf_counter()
        answers = concurrent_posts(urls, bodies)
        posted = time.perf_counter() - t0
        codes = sorted({a[0] for a in answers})
        with fleet.client() as c:
            servers = fleet.wait_settled(c, args.creates, timeout=args.timeout, poll=0.5)
            settled = time.perf_counter() - t0
            if replicas > 1:
                other = sorted(s["id"] for s in fleet.servers(c, replica=1))
                if other != sorted(s["id"] for s in servers):
                    print("  the two replicas list different servers")
                    return False
        problems = [] if codes == [202] else [f"creates answered {codes}"]
        problems += check(fleet, servers, sizes, args)
        lat = [a[2] for a in answers]
        n_active = sum(s["status"] == "ACTIVE" for s in servers)
        label = f"{backend}, {replicas} API replica(s)"
        print(
            f"  {label:<28} {args.creates} creates onto room for {args.room} "
            f"({'+'.join(map(str, split))} vCPUs): {n_active} ACTIVE, "
            f"{len(servers) - n_active} ERROR; all POSTs answered in {posted:.2f} s "
            f"(p50 {pct(lat, 0.5) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms), all "
            f"settled in {settled:.2f} s; {'invariant holds' if not problems else 'BROKEN'}",
            flush=True,
        )
        for p in problems:
            print(f"    FAIL: {p}")
        return not problems
    finally:
        fleet.stop()
        if database:
            from tests.fixtures.compute_api import drop_pg_schema

            drop_pg_schema(base, database)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--creates", type=int, default=400)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--room", type=int, default=200)
    ap.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--quick", action="store_true", help="40 creates onto room for 20")
    ap.add_argument("--dir", default=None, help="work directory parent (default: /tmp)")
    args = ap.parse_args()
    if args.quick:
        args.creates, args.room = 40, 20
    if args.room >= args.creates:
        raise SystemExit("--room must be less than --creates")
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-oc-", dir=args.dir))
    print(f"no overcommit: cores {os.cpu_count()}, {load()}")
    ok = True
    try:
        with shared_services(work) as services:
            from cowfleet.images.client import ImageClient

            with ImageClient(services[0].url, ADMIN_TOKEN) as c:
                img = c.create(
                    name="oc", disk_format="raw", container_format="bare", visibility="public"
                )
                c.upload(img.id, iter([b"\0" * (1 << 20)]), size=1 << 20)
            backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
            for backend in backends:
                ok = run(backend, work, services, str(img.id), args) and ok
        print(f"  (measured under load: {load()})")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
