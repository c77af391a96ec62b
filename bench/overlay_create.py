"""Benchmark: cowfleet's in-process qcow2 overlay writer vs ``qemu-img create``.

Same run, same directory, same backing file:

* baseline: ``qemu-img create -q -f qcow2 -F raw -b BASE OUT 20G`` (a subprocess)
* cowfleet: ``create_overlay(OUT, BASE, "raw", size=20 GiB, ...)`` in-process, both with
  the backing file inspected + policy-checked (what ``disk overlay`` does) and with
  ``backing_virtual_size`` given (what the node cache does after its own inspection);
  and once more without fsync to show what fsync costs here;
* floor: the same durable protocol as bare syscalls (temp name, ftruncate, 3 pwrites,
  fdatasync, rename, directory fsync) with no Python logic around it, to show what is
  left to win in Python and what is the device.

Also audits, with strace when installed, what ``qemu-img create`` does for durability
(fdatasync/fsync calls, directory fsync, rename or in-place write), so the comparison
is honest, and probes the filesystem (a bare create, a flush-only fdatasync): on this
shared VM their cost varies several-fold from minute to minute.

Prints medians and p90 over N runs, the ratios to qemu-img, and the machine load
(``uptime`` before and after).

    python3 bench/overlay_create.py [--runs 200] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cowfleet.formats import overlay
from cowfleet.formats.overlay import create_overlay

GiB = 1024**3
SIZE = 20 * GiB


def _fmt(samples: list[float]) -> str:
    med = statistics.median(samples) * 1000
    p90 = sorted(samples)[int(len(samples) * 0.9)] * 1000
    return f"median {med:8.3f} ms   p90 {p90:8.3f} ms"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def audit_qemu_img(qemu_img: str, base: Path, work: Path) -> str:
    """What ``qemu-img create`` does for durability, read from an strace of one run."""
    strace = shutil.which("strace")
    if strace is None:
        return "strace not installed: qemu-img create's syscalls not audited"
    out = work / "audit.qcow2"
    trace = work / "audit.trace"
    subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "-o",
            str(trace),
            "-e",
            "trace=openat,fsync,fdatasync,rename,renameat,renameat2,linkat,sync_file_range,syncfs",
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(base),
            str(out),
            "20G",
        ],
        check=True,
    )
    text = trace.read_text()
    out.unlink()
    fds: set[str] = set()
    dir_fds: set[str] = set()
    for m in re.finditer(r'openat\(AT_FDCWD, "([^"]*)", ([A-Z_|]+).*= (\d+)', text):
        if m.group(1) == str(out) and "O_RDWR" in m.group(2):
            fds.add(m.group(3))
        if m.group(1) == str(work) and "O_DIRECTORY" in m.group(2):
            dir_fds.add(m.group(3))
    created_in_place = f'"{out}", O_RDWR|O_CREAT' in text
    syncs = re.findall(r"\b(fsync|fdatasync)\((\d+)", text)
    n_data = sum(1 for call, fd in syncs if call == "fdatasync" and fd in fds)
    n_full = sum(1 for call, fd in syncs if call == "fsync" and fd in fds)
    n_dir = sum(1 for _, fd in syncs if fd in dir_fds)
    renamed = bool(re.search(r"\brename(at2?)?\(", text))
    return (
        f"qemu-img create (strace, this run): {n_data} fdatasync + {n_full} fsync of the "
        f"image, {n_dir} directory fsync, "
        + (
            "written in place under its final name"
            if created_in_place and not renamed
            else "renamed into place"
            if renamed
            else "opened as shown in the trace"
        )
        + (
            " (a crash mid-create can leave a partial image under the final name)"
            if created_in_place and not renamed
            else ""
        )
    )


def probe_fs(work: Path, n: int = 200) -> str:
    """Bare create+close and flush-only fdatasync costs in ``work`` right now."""
    d = work / "probe"
    d.mkdir()
    creates = []
    for i in range(n):
        t0 = time.perf_counter()
        fd = os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        creates.append(time.perf_counter() - t0)
        os.close(fd)
    fd = os.open(d / "0", os.O_WRONLY)
    os.write(fd, b"x")
    os.fdatasync(fd)
    flushes = []
    for _ in range(n):
        t0 = time.perf_counter()
        os.fdatasync(fd)  # nothing dirty: the device cache flush alone
        flushes.append(time.perf_counter() - t0)
    os.close(fd)
    return (
        f"filesystem probe: bare create {statistics.median(creates) * 1e6:.0f} us, "
        f"flush-only fdatasync {statistics.median(flushes) * 1e6:.0f} us (medians)"
    )


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
        load_before = uptime()
        audit = audit_qemu_img(qemu_img, base, work)
        probe = probe_fs(work)
        layout = overlay.plan_layout(SIZE, overlay.DEFAULT_CLUSTER_SIZE)
        pieces = overlay.build_metadata(
            layout, os.fsencode(str(base)), b"raw", lazy_refcounts=False
        )

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

        def floor(i: int) -> None:
            final = str(work / f"f{i}")
            tmp = str(work / f".f{i}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.ftruncate(fd, layout.file_size)
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
            os.fdatasync(fd)
            os.close(fd)
            os.rename(tmp, final)
            dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)

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
            (floor, []),
        ]
        block = 50
        for start in range(0, runs, block):
            for fn, samples in series:
                for i in range(start, min(start + block, runs)):
                    t0 = time.perf_counter()
                    fn(i)
                    samples.append(time.perf_counter() - t0)
        t_qemu, t_insp, t_trust, t_nosync, t_floor = (samples for _, samples in series)

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
        m_f = statistics.median(t_floor)
        print(f"  floor: same protocol, bare syscalls   {_fmt(t_floor)}   {m_q / m_f:6.1f}x faster")
        share = max(0.0, m_t - m_n) / m_t * 100 if m_t else 0.0
        print(
            f"  fsync (file + directory) share of create_overlay: {share:.0f}% "
            f"({(m_t - m_n) * 1000:.3f} ms)"
        )
        sizes = {p.stat().st_size for p in (work / "q0", work / "b0")}
        print(f"  file sizes (qemu-img, cowfleet): {sorted(sizes)}")
        print(
            "  cowfleet's protocol: temporary name, fdatasync, rename, directory fsync "
            "(name visible => content durable)"
        )
        print(f"  {audit}")
        print(f"  {probe}")
        print("  targets: median <= 0.5 ms and >= 20x qemu-img create")
        print(f"  uptime before: {load_before}")
        print(f"  uptime after:  {uptime()}   cpus: {os.cpu_count()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
