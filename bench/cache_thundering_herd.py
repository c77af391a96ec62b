"""Benchmark: 50 processes ask at once for the same uncached image.

Same run, same image, same embedded image service:

* baseline: one ``cowfleet cache fetch`` (a cold fetch, process start included);
* herd: ``--procs`` (default 50) ``cowfleet cache fetch`` processes started together
  against an empty cache; counts how many actually downloaded (``"fetched": true``,
  must be exactly 1) and the wall time from the first start to the last exit;
* the same herd through the library (``python -c`` + ``ImageCache``, no CLI imports);
* the floor: ``--procs`` bare ``python -c pass`` started together (interpreter start-up
  alone, on the same cores).

    python3 bench/cache_thundering_herd.py [--size-mib 1024] [--procs 50] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cache_common import MiB, fetch_argv, load, served_image, workdir


def herd(argvs: list[list[str]]) -> tuple[float, list[dict[str, object]]]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]
    outs = [p.communicate() for p in procs]
    elapsed = time.perf_counter() - t0
    for p, (_o, e) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"a fetcher failed: {e.decode()[-2000:]}")
    return elapsed, [json.loads(o) for o, _ in outs]


LIBRARY = r"""
import json, sys
from pathlib import Path
from cowfleet.cache import ImageCache
from cowfleet.config import Config
url, token_file, inst, image_id = sys.argv[1:5]
cfg = Config(home=Path(inst).parent, instances_path=Path(inst), image_url=url,
             image_token_file=Path(token_file))
def client():
    from cowfleet.images.client import ImageClient
    return ImageClient.from_config(cfg)
base = ImageCache(cfg, client).ensure_cached(image_id)
print(json.dumps({"fetched": base.fetched}))
"""


def floor(n: int) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(n)]
    for p in procs:
        p.wait()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--procs", type=int, default=50)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    wd = workdir(args.dir)
    try:
        with served_image(wd, args.size_mib * MiB) as (svc, image_id):
            print(
                f"image {args.size_mib} MiB, {args.procs} processes, {load()}, "
                f"cores {os.cpu_count()}"
            )
            singles: list[float] = []
            herds: list[float] = []
            libs: list[float] = []
            floors: list[float] = []
            for i in range(args.runs):
                inst = wd / f"single-{i}"
                t, answers = herd([fetch_argv(svc, inst, wd / "home", image_id)])
                assert answers[0]["fetched"]
                singles.append(t)
                shutil.rmtree(inst)

                inst = wd / f"herd-{i}"
                argv = fetch_argv(svc, inst, wd / "home", image_id)
                t, answers = herd([argv] * args.procs)
                downloads = sum(1 for a in answers if a["fetched"])
                herds.append(t)
                shutil.rmtree(inst)
                lib = [
                    sys.executable,
                    "-c",
                    LIBRARY,
                    svc.url,
                    str(svc.token_file),
                    str(wd / f"lib-{i}"),
                    image_id,
                ]
                tl, lanswers = herd([lib] * args.procs)
                ldownloads = sum(1 for a in lanswers if a["fetched"])
                libs.append(tl)
                shutil.rmtree(wd / f"lib-{i}")
                floors.append(floor(args.procs))
                print(
                    f"run {i}: one cold fetch {singles[-1]:.2f} s; CLI herd {t:.2f} s "
                    f"(downloads {downloads}); library herd {tl:.2f} s (downloads "
                    f"{ldownloads}); {args.procs} x python start-up {floors[-1]:.2f} s"
                )
                if downloads != 1 or ldownloads != 1:
                    print("FAIL: more than one download")
                    return 1
            s, h, lb, fl = min(singles), min(herds), min(libs), min(floors)
            print(
                f"CLI herd wall / one cold fetch     = {h / s:.2f}x  (target <= 1.3)  "
                f"[best {h:.2f} s vs {s:.2f} s]"
            )
            print(f"library herd wall / one cold fetch = {lb / s:.2f}x  [best {lb:.2f} s]")
            print(f"interpreter start-up floor         = {fl:.2f} s for {args.procs} processes")
            print(f"after: {load()}")
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
