"""Benchmark: the on-disk qcow2 table check vs a cold fetch of the same 1 GiB image.

Same run, same image: a fully allocated qcow2 (``qemu-img convert`` from 1 GiB of random
bytes), uploaded to the embedded image service (``cowfleet serve images``, serving from
memory). Timed:

* ``cowfleet cache fetch`` of it in a fresh process (stream, sha512, inspection, sparse
  write, fsync, the table check, rename): the baseline the check must stay under 5 % of;
* a sequential read + sha512 of the qcow2 file (page cache warm): a second baseline;
* :func:`cowfleet.formats.qcow2_tables.check_file` on the file, warm (tables in the page
  cache, as right after a fetch) and cold (the file dropped from the page cache first,
  as for an upload written with O_DIRECT).

Each is run ``--runs`` times; the best of each is compared.

    python3 bench/qcow2_table_check.py [--size-mib 1024] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cache_common import MiB, fetch_argv, image_service, load, upload, workdir


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 16 * MiB)
            fh.write(os.urandom(n))
            left -= n


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha512_of(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as fh:
        while block := fh.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from cowfleet.formats.qcow2_tables import check_file

    wd = workdir(args.dir)
    try:
        raw = wd / "image.raw"
        img = wd / "image.qcow2"
        random_file(raw, args.size_mib * MiB)
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)], check=True
        )
        raw.unlink()
        size = img.stat().st_size
        report = check_file(img)
        print(
            f"image {args.size_mib} MiB raw -> qcow2 of {size / MiB:.0f} MiB: "
            f"{report.data_clusters} data clusters, {report.l2_tables} L2 tables, "
            f"{report.bytes_read} table bytes read; {load()}, cores {os.cpu_count()}"
        )
        res: dict[str, list[float]] = {"fetch": [], "sha512": [], "check-warm": []}
        res["check-cold"] = []
        with image_service(wd) as svc:
            image_id = upload(svc, img, disk_format="qcow2")
            for i in range(args.runs):
                inst = wd / f"inst-{i}"
                home = wd / f"home-{i}"
                t0 = time.perf_counter()
                out = subprocess.run(
                    fetch_argv(svc, inst, home, image_id), check=True, capture_output=True
                ).stdout
                res["fetch"].append(time.perf_counter() - t0)
                assert json.loads(out)["fetched"]
                shutil.rmtree(inst)
                shutil.rmtree(home, ignore_errors=True)

                t0 = time.perf_counter()
                sha512_of(img)
                res["sha512"].append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                check_file(img)
                res["check-warm"].append(time.perf_counter() - t0)

                drop_from_cache(img)
                t0 = time.perf_counter()
                check_file(img)
                res["check-cold"].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in res.items()}
        for k, v in res.items():
            runs = " ".join(f"{x * 1000:.1f}" for x in v)
            print(f"{k:11s} best {best[k] * 1000:8.1f} ms   runs (ms): {runs}")
        for check in ("check-warm", "check-cold"):
            for base in ("fetch", "sha512"):
                ratio = best[check] / best[base] * 100
                print(f"{check} / {base:7s} = {ratio:6.2f} %  (target < 5 % of a fetch)")
        print(f"after: {load()}")
    finally:
        if not args.keep:
            shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
