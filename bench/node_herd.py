"""Benchmark: the herd, in-process. N concurrent builds of one uncached image on one node agent.

Same run, same image service (serving from memory), same image size:

* baseline: one build of the uncached image on a fresh node agent (one cold fetch:
  download, verify, overlay) -- the time from ``PUT /v1/servers/{uuid}`` to ACTIVE;
* herd: ``--builds`` (default 50) concurrent ``PUT``s of the same uncached image on
  another fresh node agent; wall time from the first PUT to the last ACTIVE.

Downloads are counted by a proxy in front of the image service (the image service's
view); the herd must download exactly once. Then the same builds again on the first
agent, the image cached (warm). Target (issue 15): herd wall <= 1.3 x (one cold build
+ the warm builds); exit 1 when the herd downloads more than once or misses it.

    python3 bench/node_herd.py [--size-mib 1024] [--builds 50] [--dir DIR]
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
from tests.fixtures.node_agent import CountingProxy, FakeController, NodeAgent  # noqa: E402

from _cache_common import MiB, image_service, load, make_image_file, upload, workdir  # noqa: E402

FLAVOR = {"name": "b1.tiny", "vcpus": 1, "ram_mb": 64, "root_gb": 0}


def spec(image_id: str, i: int) -> dict[str, Any]:
    return {
        "uuid": str(uuid_mod.uuid4()),
        "name": f"bench-{i}",
        "project_id": "bench",
        "image_id": image_id,
        "flavor": FLAVOR,
    }


def boot(agent: NodeAgent, specs: list[dict[str, Any]]) -> float:
    """PUT every spec at once; seconds until all are ACTIVE."""
    t0 = time.perf_counter()

    def put(s: dict[str, Any]) -> None:
        resp = agent.request("PUT", f"/v1/servers/{s['uuid']}", json=s, timeout=120)
        if resp.status_code != 202:
            raise SystemExit(f"PUT answered {resp.status_code}: {resp.text}")

    with concurrent.futures.ThreadPoolExecutor(min(len(specs), 64)) as pool:
        list(pool.map(put, specs))
    want = {s["uuid"] for s in specs}
    while True:  # one listing per poll: the polling must not load the node it measures
        states = {
            v["uuid"]: v["state"] for v in agent.request("GET", "/v1/servers").json()["servers"]
        }
        if any(states.get(u) == "ERROR" for u in want):
            raise SystemExit(f"a build failed: {agent.request('GET', '/v1/servers').text[:2000]}")
        if all(states.get(u) == "ACTIVE" for u in want):
            return time.perf_counter() - t0
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--builds", type=int, default=50)
    ap.add_argument("--dir", default=None, help="work directory parent (default: /tmp)")
    args = ap.parse_args()
    work = workdir(args.dir)
    try:
        with image_service(work) as svc:
            src = work / "image.raw"
            make_image_file(src, args.size_mib * MiB)
            image_id = upload(svc, src)
            src.unlink()
            proxy = CountingProxy(svc.url)
            controller = FakeController(svc.token, interval=1.0)
            agents = []
            try:
                for n, host in ((1, "127.0.0.2"), (2, "127.0.0.3")):
                    agent = NodeAgent(
                        work / f"node-{n}",
                        api_url=controller.url,
                        image_url=proxy.url,
                        token_file=svc.token_file,
                        host=host,
                        hostname=f"bench-{n}",
                        extra_env={"COWFLEET_NODE_BUILD_WORKERS": str(min(args.builds, 64))},
                    )
                    agent.start()
                    agents.append(agent)
                cold = boot(agents[0], [spec(image_id, 0)])
                cold_downloads = proxy.count(image_id)
                herd = boot(agents[1], [spec(image_id, i) for i in range(args.builds)])
                herd_downloads = proxy.count(image_id) - cold_downloads
                warm = boot(agents[0], [spec(image_id, i) for i in range(args.builds)])
            finally:
                for agent in agents:
                    agent.stop()
                controller.close()
                proxy.close()
        ratio = herd / (cold + warm)
        print(
            f"node herd: {args.builds} builds of one uncached {args.size_mib} MiB image on one "
            f"node agent: {herd:.2f} s, {herd_downloads} download(s); one cold build "
            f"{cold:.2f} s ({cold_downloads} download); the same {args.builds} builds with the "
            f"image cached {warm:.2f} s; ratio herd / (cold + warm) {ratio:.2f}x (target <= 1.3x; "
            f"herd / cold {herd / cold:.2f}x); cores {os.cpu_count()}, {load()}"
        )
        if herd_downloads != 1:
            print("FAIL: the herd downloaded more than once")
            return 1
        if ratio > 1.3:
            print("FAIL: the herd took more than 1.3 x (one cold build + the warm builds)")
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
