"""Benchmark: the CPU one peer transfer costs, against the machine's physical floor.

Two real node agents on loopback (``cowfleet serve node --driver none``) and the real
image service: node A fetches the image from the origin (not timed), then node B is
asked to build a server of it with A as its only peer source, so B fetches every byte
from A (a complete peer: A's verified base). Measured over B's build, from ``PUT`` to
ACTIVE: wall time, MB/s, and the CPU seconds of both agent processes (utime + stime from
``/proc/PID/stat``) per GiB moved.

Same run, the floor (:mod:`_floor`): a stdlib HTTP server sending A's base with
``socket.sendfile``, and ``curl -s URL | tee FILE | sha256sum`` then ``sync FILE``;
its CPU seconds per GiB and MB/s, and the product's ratio to it.

``--profile DIR`` also runs ``py-spy record`` on both agents during the transfer
(``--rounds`` transfers, each to a fresh node B) and prints the heaviest frames.

    python3 bench/peer_transfer_cpu.py [--size-mib 512] [--rounds 3] [--profile DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "src"))
from tests.fixtures.node_agent import FakeController, NodeAgent  # noqa: E402

from _cache_common import MiB, image_service, load, make_image_file, upload, workdir  # noqa: E402
from _fleet_common import cpu_seconds  # noqa: E402
from _floor import plain_transfers  # noqa: E402
from cowfleet.cache.layout import Layout  # noqa: E402

FLAVOR = {"name": "b1.tiny", "vcpus": 1, "ram_mb": 64, "root_gb": 0}
GiB = 1 << 30


def _build(agent: NodeAgent, image_id: str, sources: list[dict[str, str]] | None) -> float:
    spec: dict[str, Any] = {
        "uuid": str(uuid_mod.uuid4()),
        "name": "bench",
        "project_id": "bench",
        "image_id": image_id,
        "flavor": FLAVOR,
    }
    if sources:
        spec["sources"] = sources
    t0 = time.perf_counter()
    resp = agent.request("PUT", f"/v1/servers/{spec['uuid']}", json=spec, timeout=120)
    if resp.status_code != 202:
        raise SystemExit(f"PUT answered {resp.status_code}: {resp.text}")
    agent.wait_state(spec["uuid"], "ACTIVE", timeout=1800)
    return time.perf_counter() - t0


def _top(raw: Path, n: int = 14) -> list[str]:
    """The heaviest frames (self samples, and samples with the frame on the stack)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f.split(" (")[0] for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    out = [f"    {samples} samples; self / with-children:"]
    for frame, c in own.most_common(n):
        out.append(f"    {100 * c / samples:5.1f}% / {100 * total[frame] / samples:5.1f}%  {frame}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="peer transfers, each to a fresh B")
    ap.add_argument("--profile", default=None, help="py-spy output directory")
    ap.add_argument("--dir", default=None, help="work directory parent (default: /tmp)")
    args = ap.parse_args()
    work = workdir(args.dir)
    size = args.size_mib * MiB
    agents: list[NodeAgent] = []
    print(f"{args.size_mib} MiB image; {os.cpu_count()} cores, {load()} before", flush=True)
    try:
        with image_service(work) as svc:
            src = work / "image.raw"
            make_image_file(src, size)
            image_id = upload(svc, src)
            src.unlink()
            controller = FakeController(svc.token, interval=5.0)

            def agent(name: str, ip: int) -> NodeAgent:
                a = NodeAgent(
                    work / name,
                    api_url=controller.url,
                    image_url=svc.url,
                    token_file=svc.token_file,
                    host=f"127.0.0.{ip}",
                    hostname=name,
                )
                a.start()
                agents.append(a)
                return a

            try:
                node_a = agent("node-a", 2)
                origin = _build(node_a, image_id, None)
                print(f"A from the origin (uncapped): {origin:.2f} s", flush=True)
                assert node_a.proc is not None
                runs: list[tuple[float, float]] = []
                for r in range(args.rounds):
                    node_b = agent(f"node-b{r}", 3 + r)
                    assert node_b.proc is not None
                    pids = [node_a.proc.pid, node_b.proc.pid]
                    spies: list[subprocess.Popen[bytes]] = []
                    if args.profile:
                        out = Path(args.profile)
                        out.mkdir(parents=True, exist_ok=True)
                        for who, pid in (("a", pids[0]), ("b", pids[1])):
                            spies.append(
                                subprocess.Popen(
                                    [
                                        "py-spy",
                                        "record",
                                        "-p",
                                        str(pid),
                                        "-r",
                                        "200",
                                        "-f",
                                        "raw",
                                        "-o",
                                        str(out / f"{who}{r}.txt"),
                                        "--threads",
                                    ],
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                )
                            )
                        time.sleep(1.0)
                    cpu0 = [cpu_seconds(p) for p in pids]
                    seconds = _build(node_b, image_id, [{"host": "node-a", "url": node_a.url}])
                    cpu_a, cpu_b = (cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True))
                    cpu = cpu_a + cpu_b
                    for spy in spies:
                        spy.send_signal(2)  # SIGINT: py-spy writes its file
                    for spy in spies:
                        spy.wait(60)
                    runs.append((seconds, cpu))
                    print(
                        f"B{r} from A: {seconds:.2f} s, {size / seconds / 1e6:.0f} MB/s, agents' "
                        f"CPU {cpu:.2f} s (A {cpu_a:.2f}, B {cpu_b:.2f}) = "
                        f"{cpu / (size / GiB):.2f} "
                        f"CPU-s/GiB ({load()})",
                        flush=True,
                    )
                    node_b.stop()
                base = Layout(node_a.instances).paths(image_id).base
                floors = [plain_transfers(base, [work / "floor"]) for _ in range(args.rounds)]
            finally:
                for a in agents:
                    a.stop()
                controller.close()
        best = min(runs, key=lambda x: x[1])
        fbest = min(floors, key=lambda f: f.cpu)
        per = best[1] / (size / GiB)
        print()
        print(
            f"one peer transfer of {args.size_mib} MiB (node agent A -> node agent B, best of "
            f"{len(runs)} by CPU): {best[0]:.2f} s, {size / best[0] / 1e6:.0f} MB/s, "
            f"{per:.2f} CPU-s/GiB (both agents)"
        )
        print(
            "floor (sendfile server -> curl | tee | openssl sha256 + fsync, best of "
            f"{len(floors)}): "
            f"{fbest.seconds:.2f} s, {fbest.mbs_each:.0f} MB/s, {fbest.cpu_per_gib:.2f} CPU-s/GiB"
        )
        print(f"product / floor: {per / fbest.cpu_per_gib:.2f}x the CPU; {load()} after")
        if args.profile:
            for r in range(args.rounds):
                for who in ("a", "b"):
                    raw = Path(args.profile) / f"{who}{r}.txt"
                    if raw.is_file():
                        print(f"  py-spy, node {who.upper()} round {r}:")
                        print("\n".join(_top(raw)))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
