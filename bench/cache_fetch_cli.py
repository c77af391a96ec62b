"""Benchmark: ``cowfleet cache fetch`` as a whole process against curl, interleaved.

``cache_cold_fetch.py`` runs its cases in a fixed order, so the CLI always follows the
Nova-order case (a gigabyte written, fsynced, read back and unlinked) and pays for it.
Here the three cases run in turn, the order rotating each round, each after ``os.sync()``,
and each timed from ``exec`` to exit:

* curl: ``curl -o FILE`` of the image's data (the network floor, no checks);
* cli: ``python3 -m cowfleet cache fetch IMAGE`` into an empty ``_base`` (start-up, the
  image record, the hash tree, the fetch with every check, install, exit);
* library: the same fetch through ``ImageCache.ensure_cached`` in a fresh interpreter
  (what the CLI adds is its own start-up and argument handling).

* cli-sha512: the same fetch of an image without a hash tree (as from real Glance: the
  whole-image sha512 verifies it), in a fresh interpreter; its floor is the slower of curl
  and ``sha512`` alone over the same bytes (timed in the same round from curl's file).

Also timed: the CLI's hit path (the image already cached), which is its start-up cost.
Target (issue 14): within 1.15x of the slower of curl and the verifying digest alone.

    python3 bench/cache_fetch_cli.py [--size-mib 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cache_common import DIGEST_ALONE, FETCH_SHA512, MiB, fetch_argv, load, served_image, workdir

LIBRARY = r"""
import sys
from pathlib import Path
from cowfleet.cache.cache import ImageCache
from cowfleet.config import Config
from cowfleet.images.client import ImageClient
url, token, image_id, inst, home = sys.argv[1:6]
cfg = Config(home=Path(home), instances_path=Path(inst), image_url=url)
with ImageClient(url, token, timeout=300) as client:
    assert ImageCache(cfg, client).ensure_cached(image_id).fetched
"""


def timed(argv: list[str]) -> float:
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    wd = workdir(None)
    res: dict[str, list[float]] = {
        "curl": [], "sha512": [], "cli": [], "library": [], "cli-sha512": [], "cli hit": []
    }  # fmt: skip
    try:
        with served_image(wd, args.size_mib * MiB) as (svc, image_id):
            url = f"{svc.url}/v2/images/{image_id}/file"
            inst, home = wd / "inst", wd / "home"
            argv = {
                "curl": ["curl", "-sS", "-f", "-o", str(wd / "curl.out"),
                         "-H", f"X-Auth-Token: {svc.token}", url],
                "cli": fetch_argv(svc, inst, home, image_id),
                "library": [sys.executable, "-c", LIBRARY, svc.url, svc.token, image_id,
                            str(inst), str(home)],
                "cli-sha512": [sys.executable, "-c", FETCH_SHA512, svc.url, svc.token, image_id,
                               str(inst), str(home)],
            }  # fmt: skip
            print(f"image {args.size_mib} MiB, {load()}, cores {os.cpu_count()}")
            order = list(argv)
            for r in range(args.rounds):
                for case in order[r % 4 :] + order[: r % 4]:
                    res[case].append(timed(argv[case]))
                    if case == "curl":  # the digest alone, over the bytes curl wrote
                        sha = [sys.executable, "-c", DIGEST_ALONE, str(wd / "curl.out"), "sha512"]
                        res["sha512"].append(timed(sha))
                    if case == "cli":
                        res["cli hit"].append(timed(argv["cli"]))
                    shutil.rmtree(inst, ignore_errors=True)
                    (wd / "curl.out").unlink(missing_ok=True)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    for case, values in res.items():
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"{case:8s} best {min(values):.2f} s  median {median(values):.2f} s  runs: {runs}")
    curl = min(res["curl"])
    ratio_median = median(res["cli"]) / median(res["curl"])
    print(f"cli / curl     = {min(res['cli']) / curl:.2f}x best, {ratio_median:.2f}x median"
          "  (target <= 1.15)")  # fmt: skip
    print(f"library / curl = {min(res['library']) / curl:.2f}x best (a fresh interpreter too)")
    floor = max(curl, min(res["sha512"]))
    print(f"cli-sha512 / max(curl, sha512 alone) = {min(res['cli-sha512']) / floor:.2f}x best"
          "  (target <= 1.15)")  # fmt: skip
    print(f"cli start-up (hit path) = {min(res['cli hit']):.2f} s;  after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
