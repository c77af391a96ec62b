"""Benchmark: ``GET /servers/detail`` with 10,000 servers in the database, paged by 1,000.

The database is seeded in bulk through the API's own models (one multi-row INSERT of
``--servers`` rows, as a max_count create leaves them: placed on 8 nodes, ACTIVE, with
their flavor, image properties and placement record), then a real
``cowfleet serve api`` opens it. The admin lists every project's servers
(``all_tenants=1``) page by page (``limit`` and the previous page's last id as
``marker``), ``--rounds`` times; each page's time is the client's (request sent ->
whole body read, one keep-alive connection; the client's JSON parse not counted).

Baseline, same run, same database: the raw SQL select of the same rows (``SELECT *
... WHERE deleted = false AND seq < :marker ORDER BY seq DESC LIMIT :limit``) through
the same driver, fetched into tuples. Target: every page within 200 ms. Also printed:
the API process's CPU time per page (``/proc``), which the machine's load does not
inflate as it does the wall time.

    python3 bench/server_list.py [--servers 10000] [--limit 1000] [--rounds 3]
                                 [--backend sqlite|postgres]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, text

from _cache_common import load
from _fleet_common import ADMIN_TOKEN, MICROVERSION, ComputeApi, cpu_seconds, write_tokens

TARGET_S = 0.200
NODES = [f"node-{i:02d}" for i in range(8)]
FLAVOR = {
    "id": "1",
    "original_name": "m1.tiny",
    "vcpus": 1,
    "ram": 512,
    "disk": 1,
    "ephemeral": 0,
    "swap": 0,
    "extra_specs": {},
}


def seed(url: str, n: int) -> float:
    """``n`` ACTIVE servers and their 8 nodes, in bulk; seconds taken."""
    from cowfleet.api.db.engine import Database
    from cowfleet.api.db.models import NodeRow, ServerRow

    t0 = time.perf_counter()
    db = Database.open(url)
    now = time.time()
    image = str(uuid.uuid4())
    try:
        with db.write() as s:
            s.execute(
                insert(NodeRow),
                [
                    {
                        "id": str(uuid.uuid4()),
                        "hostname": h,
                        "url": f"http://127.0.0.{i + 2}:1",
                        "hypervisor_type": "none",
                        "arch": "x86_64",
                        "vcpus": 2048,
                        "ram_mb": 1 << 21,
                        "disk_gb": 1 << 16,
                        "disk_free_gb": 1 << 16,
                        "vcpus_used": n // 8,
                        "ram_used_mb": 512 * n // 8,
                        "disk_used_gb": n // 8,
                        "enabled": True,
                        "cache": [],
                        "instances": [],
                        "unknown": [],
                        "created_at": now,
                        "last_heartbeat": now,
                    }
                    for i, h in enumerate(NODES)
                ],
            )
            rows: list[dict[str, Any]] = []
            for i in range(n):
                host = NODES[i % len(NODES)]
                rows.append(
                    {
                        "id": str(uuid.uuid4()),
                        "name": f"vm-{i + 1}",
                        "project_id": "alpha",
                        "image_id": image,
                        "image_props": {"hw_disk_bus": "virtio", "os_distro": "cirros"},
                        "flavor_id": "1",
                        "flavor": FLAVOR,
                        "vm_state": "active",
                        "task_state": None,
                        "power_state": 1,
                        "host": host,
                        "claim_host": host,
                        "attempts": 1,
                        "tried_hosts": [],
                        "placement": {
                            "host": host,
                            "attempt": 1,
                            "weight": 3.0,
                            "weights": {"cache": 2.0, "ram": 1.0},
                            "filters": ["ComputeFilter", "RamFilter"],
                            "hosts_considered": 8,
                            "hosts_passed": 8,
                            "image_on_host": True,
                        },
                        "fault": None,
                        "deleted": False,
                        "created_at": now,
                        "updated_at": now,
                        "launched_at": now,
                        "deleted_at": None,
                        "deadline": None,
                    }
                )
            for start in range(0, n, 2000):
                s.execute(insert(ServerRow), rows[start : start + 2000])
    finally:
        db.close()
    return time.perf_counter() - t0


def raw_pages(url: str, n: int, limit: int) -> list[float]:
    """The same pages as raw SQL: seconds per page."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    times = []
    try:
        with engine.connect() as conn:
            marker = None
            seen = 0
            while seen < n:
                t0 = time.perf_counter()
                if marker is None:
                    got = conn.execute(
                        text(
                            "SELECT * FROM compute_servers WHERE deleted = false "
                            "ORDER BY seq DESC LIMIT :l"
                        ),
                        {"l": limit},
                    ).all()
                else:
                    got = conn.execute(
                        text(
                            "SELECT * FROM compute_servers WHERE deleted = false AND seq < :m "
                            "ORDER BY seq DESC LIMIT :l"
                        ),
                        {"m": marker, "l": limit},
                    ).all()
                times.append(time.perf_counter() - t0)
                if not got:
                    break
                seen += len(got)
                marker = got[-1].seq
    finally:
        engine.dispose()
    return times


def api_pages(api: ComputeApi, n: int, limit: int) -> list[float]:
    """Every page of ``GET /servers/detail``: seconds per page (checks the ids add up)."""
    times = []
    ids: set[str] = set()
    headers = {"X-Auth-Token": ADMIN_TOKEN, "OpenStack-API-Version": MICROVERSION}
    with httpx.Client(headers=headers, timeout=60) as c:
        url: str | None = f"{api.endpoint}/servers/detail?all_tenants=1&limit={limit}"
        while url:
            t0 = time.perf_counter()
            resp = c.get(url)  # the whole body read: the page as the API serves it
            times.append(time.perf_counter() - t0)
            doc = resp.json()
            if resp.status_code != 200:
                raise SystemExit(f"GET {url} answered {resp.status_code}: {resp.text[:500]}")
            ids.update(s["id"] for s in doc["servers"])
            url = next((ln["href"] for ln in doc.get("servers_links", ())), None)
    if len(ids) != n:
        raise SystemExit(f"the pages held {len(ids)} distinct servers, not {n}")
    return times


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=10_000)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--quick", action="store_true", help="2,000 servers, pages of 200")
    ap.add_argument("--dir", default=None, help="work directory parent (default: /tmp)")
    args = ap.parse_args()
    if args.quick:
        args.servers, args.limit = 2000, 200
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-list-", dir=args.dir))
    base = ""
    if args.backend == "postgres":
        from tests.fixtures.compute_api import pg_schema_url

        base = os.environ.get("COWFLEET_TEST_POSTGRES_URL", "")
        if not base:
            raise SystemExit(
                "COWFLEET_TEST_POSTGRES_URL is not set: source scripts/setup/postgres.sh"
            )
        url = pg_schema_url(base)
    else:
        url = f"sqlite:///{work / 'compute.sqlite'}"
    api = None
    try:
        seeded = seed(url, args.servers)
        tokens = write_tokens(work / "tokens.toml", ADMIN_TOKEN)
        api = ComputeApi(work / "api", "http://127.0.0.1:9", tokens, database=url)
        api.start()
        api_t: list[float] = []
        raw_t: list[float] = []
        cpu = 0.0
        assert api.proc is not None
        for _ in range(args.rounds):
            cpu0 = cpu_seconds(api.proc.pid)
            api_t += api_pages(api, args.servers, args.limit)
            cpu += cpu_seconds(api.proc.pid) - cpu0
            raw_t += raw_pages(url, args.servers, args.limit)
        worst = max(api_t)
        print(
            f"server list ({args.backend}): {args.servers} servers seeded in {seeded:.2f} s; "
            f"GET /servers/detail pages of {args.limit}, {len(api_t)} pages over "
            f"{args.rounds} round(s): {ms(api_t)} (target <= {TARGET_S * 1000:.0f} ms per page), "
            f"API CPU {cpu / len(api_t) * 1000:.0f} ms per page (CPU time: less inflated by "
            f"load than wall time); "
            f"raw SQL select of the same rows {ms(raw_t)}; ratio of p50s "
            f"{statistics.median(api_t) / statistics.median(raw_t):.1f}x; "
            f"cores {os.cpu_count()}, {load()} (measured under load)"
        )
        if worst > TARGET_S:
            print(f"FAIL: the slowest page took {worst * 1000:.0f} ms (> {TARGET_S * 1000:.0f} ms)")
            return 1
        return 0
    finally:
        if api is not None:
            api.stop()
        if base:
            from tests.fixtures.compute_api import drop_pg_schema

            drop_pg_schema(base, url)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
