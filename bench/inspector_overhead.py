"""Inspector overhead on a 1 GiB stream in 64 KiB chunks, against one sha512 pass.

The stream is generated in memory: a real qcow2 v3 header cluster up front, then
pseudo-random data clusters. Prints both times and the ratio (target: < 5 %).

    python3 bench/inspector_overhead.py [--size-mib 1024] [--chunk-kib 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path

from cowfleet.formats.inspector import Inspector, inspect_path


def qcow2_header_cluster(virtual_size: int) -> bytes:
    cs = 65536
    hdr = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb",
        3,
        0,
        0,
        16,
        virtual_size,
        0,
        (virtual_size + (1 << 29) - 1) >> 29,
        3 * cs,
        cs,
        1,
        0,
        0,
        0,
        0,
        0,
        4,
        112,
    )
    hdr += b"\0" * 8 + struct.pack(">II", 0, 0)
    return hdr.ljust(cs, b"\0")


def chunks(size: int, chunk: int) -> list[bytes]:
    """A qcow2 header cluster then data; a pool of distinct chunks reused round-robin."""
    pool = [os.urandom(chunk) for _ in range(64)]
    out = [qcow2_header_cluster(size)[:chunk]]
    n = size // chunk
    out.extend(pool[i % len(pool)] for i in range(1, n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-kib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size, chunk = args.size_mib << 20, args.chunk_kib << 10
    stream = chunks(size, chunk)
    best_sha = best_insp = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        h = hashlib.sha512()
        for c in stream:
            h.update(c)
        h.hexdigest()
        best_sha = min(best_sha, time.perf_counter() - t0)

        t0 = time.perf_counter()
        insp = Inspector()
        for c in stream:
            insp.feed(c)
        result = insp.finish()
        best_insp = min(best_insp, time.perf_counter() - t0)
    assert result.format == "qcow2", result
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.qcow2"
        path.write_bytes(qcow2_header_cluster(20 << 30) + b"\0" * (3 * 65536))
        runs = []
        for _ in range(500):
            t0 = time.perf_counter()
            inspect_path(path)
            runs.append(time.perf_counter() - t0)
    load = os.getloadavg()
    print(f"stream: {size >> 20} MiB in {chunk >> 10} KiB chunks ({len(stream)} chunks)")
    print(f"sha512:    {best_sha:.3f} s (best of {args.repeat})")
    print(f"inspector: {best_insp:.4f} s (best of {args.repeat})")
    print(f"ratio:     {100 * best_insp / best_sha:.2f} % of sha512 (target < 5 %)")
    print(f"inspect_path on a 256 KiB qcow2 file: median {statistics.median(runs) * 1e3:.3f} ms")
    print(f"loadavg:   {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
