"""Benchmark: cowfleet's in-process qcow2 overlay writer vs ``qemu-img create``.

Same run, same directory, same backing file:

* baseline: ``qemu-img create -q -f qcow2 -F raw -b BASE OUT 20G`` (a subprocess)
* cowfleet: ``create_overlay(OUT, BASE, "raw", size=20 GiB, ...)`` in-process, both with
  the backing file inspected + policy-checked (what ``disk overlay`` does) and with
  ``backing_virtual_size`` given (what the node cache does after its own inspection);
  and once more without fsync to show what fsync costs here.

Prints medians and p90 over N runs, the ratios to qemu-img, and the machine load.

    python3 bench/overlay_create.py [--runs 200] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cowfleet.formats.overlay import create_overlay

GiB = 1024**3
SIZE = 20 * GiB


def _fmt(samples: list[float]) -> str:
    med = statistics.median(samples) * 1000
    p90 = sorted(samples)[int(len(samples) * 0.9)] * 1000
    return f"median {med:8.3f} ms   p90 {p90:8.3f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        print("qemu-img not installed: no baseline", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-", dir=args.dir))
    try:
        base = work / "base.raw"
        with base.open("wb") as f:
            f.truncate(1 * GiB)
        runs = args.runs

        def qemu(i: int) -> None:
            subprocess.run(
                [
                    qemu_img,
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    str(base),
                    str(work / f"q{i}"),
                    str(SIZE),
                ],
                check=True,
            )

        def ours_inspected(i: int) -> None:
            create_overlay(work / f"a{i}", base, "raw", size=SIZE)

        def ours_trusted(i: int) -> None:
            create_overlay(work / f"b{i}", base, "raw", size=SIZE, backing_virtual_size=GiB)

        def ours_nosync(i: int) -> None:
            create_overlay(
                work / f"c{i}", base, "raw", size=SIZE, backing_virtual_size=GiB, durable=False
            )

        # Warm up imports and caches. Each series runs in blocks of 50 (interleaving single
        # runs would make our fsync pay for qemu-img's journal traffic); the blocks rotate
        # so that a change in machine load hits every series alike.
        ours_inspected(-1)
        ours_trusted(-1)
        qemu(-1)
        series: list[tuple[Callable[[int], object], list[float]]] = [
            (qemu, []),
            (ours_inspected, []),
            (ours_trusted, []),
            (ours_nosync, []),
        ]
        block = 50
        for start in range(0, runs, block):
            for fn, samples in series:
                for i in range(start, min(start + block, runs)):
                    t0 = time.perf_counter()
                    fn(i)
                    samples.append(time.perf_counter() - t0)
        t_qemu, t_insp, t_trust, t_nosync = (samples for _, samples in series)

        m_q = statistics.median(t_qemu)
        m_i = statistics.median(t_insp)
        m_t = statistics.median(t_trust)
        m_n = statistics.median(t_nosync)
        print(f"overlay creation, 20 GiB qcow2 on a 1 GiB raw base, {runs} runs each, in {work}")
        print(f"  qemu-img create (subprocess)            {_fmt(t_qemu)}")
        print(
            f"  create_overlay, backing inspected       {_fmt(t_insp)}   {m_q / m_i:6.1f}x faster"
        )
        print(
            f"  create_overlay, backing_virtual_size    {_fmt(t_trust)}   {m_q / m_t:6.1f}x faster"
        )
        print(
            f"  create_overlay, no fsync (durable=False){_fmt(t_nosync)}   {m_q / m_n:6.1f}x faster"
        )
        share = max(0.0, m_t - m_n) / m_t * 100 if m_t else 0.0
        print(
            f"  fsync (file + directory) share of create_overlay: {share:.0f}% "
            f"({(m_t - m_n) * 1000:.3f} ms)"
        )
        sizes = {p.stat().st_size for p in (work / "q0", work / "b0")}
        print(f"  file sizes (qemu-img, cowfleet): {sorted(sizes)}")
        print(
            f"  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
            f"cpus: {os.cpu_count()}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
