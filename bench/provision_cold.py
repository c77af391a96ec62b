"""Benchmark: first instance of an uncached 1 GiB image vs (one cold fetch + warm provisioning).

Same run, same image service, fresh instances paths:

* A: ``Provisioner.create`` on an empty node — image lookup, the cold fetch into
  ``_base`` (download + streaming inspection + verification), overlays, disk.info;
* B: measured separately on another empty node: ``ImageCache.ensure_cached`` alone
  (the cold fetch), then ``Provisioner.create`` with the base now cached (warm).

The ratio A / (B.fetch + B.warm) should be at most 1.2: the first boot costs one
fetch and nothing more. The rounds alternate A and B; medians are printed.
Also prints a ``curl`` download of the same image to /dev/null as a transport
reference, when curl is installed.

    python3 bench/provision_cold.py [--rounds 3] [--size-mib 1024] [--dir /var/tmp]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cowfleet.cache import ImageCache
from cowfleet.compute.drivers.none import NoneDriver
from cowfleet.compute.provision import Provisioner
from cowfleet.images.client import ImageClient
from provision_warm import image_service, make_config, upload_raw

MIB = 1024**2


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-cold-", dir=args.dir))
    try:
        img = work / "image.raw"
        with img.open("wb") as fh:  # incompressible data, written in 16 MiB pieces
            for _ in range(args.size_mib // 16):
                fh.write(os.urandom(16 * MIB))
        with image_service(work) as (url, token), ImageClient(url, token) as client:
            image_id = upload_raw(client, "bench-cold", img)
            img.unlink()
            t_first: list[float] = []
            t_fetch: list[float] = []
            t_warm: list[float] = []
            t_curl: list[float] = []
            curl = shutil.which("curl")
            for r in range(args.rounds):
                # A: first instance on an empty node
                cfg = make_config(work / f"a{r}", url, token)
                with Provisioner(
                    cfg, images=client, cache=ImageCache(cfg, client), driver=NoneDriver()
                ) as prov:
                    t0 = time.perf_counter()
                    prov.create("first", image_id, "m1.small")
                    t_first.append(time.perf_counter() - t0)
                shutil.rmtree(work / f"a{r}")
                # B: the cold fetch alone, then warm provisioning
                cfg = make_config(work / f"b{r}", url, token)
                cache = ImageCache(cfg, client)
                with Provisioner(cfg, images=client, cache=cache, driver=NoneDriver()) as prov:
                    t0 = time.perf_counter()
                    cache.ensure_cached(image_id)
                    t_fetch.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    prov.create("warm", image_id, "m1.small")
                    t_warm.append(time.perf_counter() - t0)
                shutil.rmtree(work / f"b{r}")
                if curl:
                    t0 = time.perf_counter()
                    subprocess.run(
                        [
                            curl,
                            "-sf",
                            "-o",
                            "/dev/null",
                            "-H",
                            f"X-Auth-Token: {token}",
                            f"{url}/v2/images/{image_id}/file",
                        ],
                        check=True,
                    )
                    t_curl.append(time.perf_counter() - t0)
        a = statistics.median(t_first)
        f = statistics.median(t_fetch)
        w = statistics.median(t_warm)
        print(
            f"first instance of an uncached {args.size_mib} MiB raw image, m1.small, none driver, "
            f"{args.rounds} rounds, in {work}"
        )
        print(
            f"  A  first create (fetch + provision)   median {a * 1000:9.1f} ms  "
            f"{[round(x * 1000) for x in t_first]}"
        )
        print(
            f"  B  cold fetch (ensure_cached)         median {f * 1000:9.1f} ms  "
            f"{[round(x * 1000) for x in t_fetch]}"
        )
        print(
            f"  B  warm create                        median {w * 1000:9.1f} ms  "
            f"{[round(x * 1000, 1) for x in t_warm]}"
        )
        print(f"  ratio A / (fetch + warm) = {a / (f + w):.3f}   (target <= 1.2)")
        if t_curl:
            c = statistics.median(t_curl)
            print(f"  reference: curl download to /dev/null   median {c * 1000:9.1f} ms")
        print(
            f"  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
            f"cpus: {os.cpu_count()}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
