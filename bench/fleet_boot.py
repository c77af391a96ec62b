"""Benchmark: N servers across M node agents (``none`` driver) from one uncached image.

Real processes on loopback: ``cowfleet serve images``, ``cowfleet serve api`` (SQLite),
M ``cowfleet serve node --driver none``. Each variant gets a fresh API database and
fresh node agents (so the image is uncached on every node), the same image service:

* ``one request``: one ``POST /servers`` with ``max_count=N``;
* ``N requests``: N concurrent ``POST /servers`` (64 client threads);
* each of those with the cache weigher on (the default) and off
  (``COWFLEET_API_CACHE_WEIGHT=0``: the RAM weigher alone spreads the servers);
* baseline: today's sequential local ``cowfleet server create --driver none`` (the
  single-node CLI, one process per server), for ``--cli`` servers, scaled to N as
  (first + mean of the rest x (N - 1)).

Per variant: wall time from the first request to the last server ACTIVE, create
latency p50/p99 (request sent -> the server's ``launched_at``, the API's own record
of its ACTIVE), image downloads served (counted by a proxy in front of the image
service: the service's side), and the API process's CPU seconds per boot (from
``/proc/PID/stat``, including the light 1 s polling of the list).

    python3 bench/fleet_boot.py [--servers 200] [--nodes 8] [--size-mib 64] [--cli 20]
    python3 bench/fleet_boot.py --quick      # 24 servers, 4 nodes, 8 MiB, 4 CLI
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _cache_common import MiB, load, make_image_file
from _fleet_common import (
    ADMIN_TOKEN,
    CountingProxy,
    Fleet,
    ImageService,
    concurrent_posts,
    cpu_seconds,
    create_body,
    parse_ts,
    shared_services,
    summary,
)

# Each agent offers 16 vCPUs (64 m1.tiny at the default cpu ratio 4.0), RAM and disk to
# spare: the cache weigher then fills the nodes holding the image first.
CAPACITY = (16, 1 << 20, 100_000)


def upload(images: ImageService, work: Path, size: int) -> str:
    from cowfleet.images.client import ImageClient

    src = work / "image.raw"
    make_image_file(src, size)
    with ImageClient(images.url, ADMIN_TOKEN, timeout=300) as c:
        img = c.create(
            name="bench-image", disk_format="raw", container_format="bare", visibility="public"
        )
        with open(src, "rb") as fh:
            c.upload(img.id, fh, size=size)
    src.unlink()
    return str(img.id)


def run_variant(
    name: str,
    work: Path,
    services: tuple[ImageService, Path, CountingProxy],
    image_id: str,
    args: argparse.Namespace,
    *,
    one_request: bool,
    cache_weight: float | None,
) -> dict[str, Any]:
    images, tokens, proxy = services
    settings = {} if cache_weight is None else {"COWFLEET_API_CACHE_WEIGHT": str(cache_weight)}
    fleet = Fleet(work / name, args.nodes, CAPACITY, api_settings=settings)
    fleet.start(images, tokens, proxy)
    try:
        n = args.servers
        endpoint = f"{fleet.apis[0].endpoint}/servers"
        before_dl = proxy.count(image_id)
        cpu0 = cpu_seconds(fleet.api_pid())
        t0 = time.time()
        if one_request:
            answers = concurrent_posts([endpoint], [create_body("bench", image_id, count=n)])
            sent = {f"bench-{i + 1}": answers[0][1] for i in range(n)}
        else:
            bodies = [create_body(f"bench-{i}", image_id) for i in range(n)]
            answers = concurrent_posts([endpoint] * n, bodies)
            sent = {f"bench-{i}": a[1] for i, a in enumerate(answers)}
        bad = [a[0] for a in answers if a[0] != 202]
        if bad:
            raise SystemExit(f"{name}: {len(bad)} create(s) answered {sorted(set(bad))}")
        with fleet.client() as c:
            servers = fleet.wait_settled(c, n, timeout=args.timeout)
        cpu = cpu_seconds(fleet.api_pid()) - cpu0
        not_active = [s for s in servers if s["status"] != "ACTIVE"]
        if not_active:
            raise SystemExit(
                f"{name}: {len(not_active)} server(s) not ACTIVE: "
                f"{not_active[0]['status']} {not_active[0].get('fault')}"
            )
        launched = {s["name"]: parse_ts(s["OS-SRV-USG:launched_at"]) for s in servers}
        lat = [v - sent[k] for k, v in launched.items() if v is not None and k in sent]
        per_host: dict[str, int] = {}
        for s in servers:
            host = s["OS-EXT-SRV-ATTR:host"]
            per_host[host] = per_host.get(host, 0) + 1
        return {
            "name": name,
            "wall": max(v for v in launched.values() if v is not None) - t0,
            "lat": lat,
            "downloads": proxy.count(image_id) - before_dl,
            "cpu_per_boot": cpu / n,
            "hosts": len(per_host),
        }
    finally:
        fleet.stop()


def run_cli(
    work: Path, services: tuple[ImageService, Path, CountingProxy], image_id: str, count: int
) -> dict[str, Any]:
    """``cowfleet server create --driver none`` one after another, one node, one process each."""
    _images, _tokens, proxy = services
    root = work / "cli"
    root.mkdir()
    token = root / "token"
    token.write_text(ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    before_dl = proxy.count(image_id)
    times = []
    for i in range(count):
        argv = [
            sys.executable, "-m", "cowfleet", "server", "create",
            "--home", str(root / "home"),
            "--image", image_id, "--flavor", "m1.tiny", "--driver", "none",
            "--instances-path", str(root / "instances"),
            "--image-url", proxy.url, "--token-file", str(token),
            f"cli-{i}",
        ]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"cowfleet server create failed: {done.stderr[-2000:]}")
    return {"times": times, "downloads": proxy.count(image_id) - before_dl}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--cli", type=int, default=20, help="servers of the CLI baseline (scaled)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--quick", action="store_true", help="24 servers, 4 nodes, 8 MiB, 4 CLI")
    ap.add_argument("--dir", default=None, help="work directory parent (default: /tmp)")
    args = ap.parse_args()
    if args.quick:
        args.servers, args.nodes, args.size_mib, args.cli = 24, 4, 8, 4
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-fleet-", dir=args.dir))
    print(f"fleet boot: {args.servers} servers, {args.nodes} node agents (none driver), one "
          f"uncached {args.size_mib} MiB image; cores {os.cpu_count()}, {load()}")  # fmt: skip
    try:
        with shared_services(work) as services:
            image_id = upload(services[0], work, args.size_mib * MiB)
            results = []
            for label, one, weight in (
                ("one-request", True, None),
                ("concurrent", False, None),
                ("one-request-spread", True, 0.0),
                ("concurrent-spread", False, 0.0),
            ):
                r = run_variant(
                    label, work, services, image_id, args, one_request=one, cache_weight=weight
                )
                results.append(r)
                print(
                    f"  {label:<20} wall {r['wall']:6.2f} s  latency {summary(r['lat'])}  "
                    f"downloads {r['downloads']}  hosts used {r['hosts']}  "
                    f"API CPU {r['cpu_per_boot'] * 1000:.1f} ms/boot",
                    flush=True,
                )
            cli = run_cli(work, services, image_id, args.cli)
            t = cli["times"]
            warm = sum(t[1:]) / max(1, len(t) - 1)
            scaled = t[0] + warm * (args.servers - 1)
            print(
                f"  {'CLI sequential':<20} {len(t)} servers {sum(t):.2f} s (first {t[0]:.2f} s, "
                f"then {warm:.2f} s each; downloads {cli['downloads']}); scaled to "
                f"{args.servers}: {scaled:.1f} s"
            )
            base = results[0]["wall"]
            for r in results:
                print(
                    f"  ratio {r['name']:<20} vs CLI sequential (scaled): "
                    f"{r['wall'] / scaled:.3f}x; vs one-request: {r['wall'] / base:.2f}x"
                )
        print(f"  (measured under load: {load()})")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
