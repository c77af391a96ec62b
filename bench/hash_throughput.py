"""Digest throughput on this machine: the sha256 hash tree against sha512 and md5.

    python3 bench/hash_throughput.py [--size-mib 1024] [--leaf-mib 4] [--chunk-mib 4]
        [--rounds 3]

Hashes the same buffer (random bytes, allocated and touched once before timing) with
each digest in turn, fed in chunks as the upload lanes feed them, and prints the best
of ``--rounds`` for each, in MB/s and as a ratio to sha512 (the digest a node verifies
with when an image has no tree, as from real Glance). One core each; the machine is
shared, so compare figures of one run only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import time
from collections.abc import Callable

from cowfleet.hashtree import TreeBuilder

MiB = 1024 * 1024


def timed(
    buf: memoryview, chunk: int, make: Callable[[], Callable[[memoryview], object]]
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) to feed ``buf`` in ``chunk`` pieces."""
    feed = make()
    start, cpu = time.perf_counter(), time.thread_time()
    for off in range(0, len(buf), chunk):
        feed(buf[off : off + chunk])
    return time.perf_counter() - start, time.thread_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--leaf-mib", type=int, default=4, help="hash tree leaf size (MiB)")
    ap.add_argument("--chunk-mib", type=int, default=4, help="bytes per update call (MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    size, chunk = args.size_mib * MiB, args.chunk_mib * MiB
    buf = memoryview(bytearray(os.urandom(64 * MiB)) * (size // (64 * MiB) or 1))[:size]
    flags = open("/proc/cpuinfo").read()  # noqa: SIM115 - read once, closed by GC
    print(
        subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        f"; {os.cpu_count()} CPUs, sha_ni={'sha_ni' in flags}, buffer {len(buf) / MiB:.0f} MiB,"
        f" chunks of {args.chunk_mib} MiB",
    )

    def tree() -> Callable[[memoryview], object]:
        return TreeBuilder(args.leaf_mib * MiB).update

    def sha512() -> Callable[[memoryview], object]:
        return hashlib.sha512().update

    def md5() -> Callable[[memoryview], object]:
        return hashlib.md5(usedforsecurity=False).update

    def sha256() -> Callable[[memoryview], object]:
        return hashlib.sha256().update

    cases = {
        f"sha256 tree ({args.leaf_mib} MiB leaves)": tree,
        "sha256 (plain)": sha256,
        "sha512": sha512,
        "md5": md5,
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, make in cases.items():  # interleaved: load changes hit every digest
            t = timed(buf, chunk, make)
            best[name] = min(best.get(name, t), t)
    base = size / best["sha512"][0]
    for name, (wall, cpu) in best.items():
        rate = size / wall
        print(
            f"{name:28s} {rate / 1e6:7.0f} MB/s  ({wall:.2f} s, {cpu / (size / 2**30):.2f} "
            f"CPU-s/GiB)  x{rate / base:.2f} of sha512"
        )


if __name__ == "__main__":
    main()
