"""Benchmark: ``ImageCache.ensure_cached`` on a cache hit (target: median <= 1 ms).

The base is put in place by a real fetch from an in-process fake-free source: a
local file served through the cache's own sink (no image service needed for the
hit path). During the timed loop, starting a subprocess or touching the network
raises, so the figure also proves the hit path uses neither.

Baseline in the same run: ``os.stat`` + reading a small JSON file (the floor of any
metadata-backed hit), and ``qemu-img info`` on the base (what Nova runs per boot).

    python3 bench/cache_hit.py [--runs 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cowfleet.cache.cache import ImageCache
from cowfleet.config import Config

MiB = 1024 * 1024


class _LocalImage:
    def __init__(self, image_id: str, data: bytes) -> None:
        self.id, self.name, self.status, self.disk_format = image_id, "bench", "active", "raw"
        self.container_format, self.size, self.checksum = "bare", len(data), None
        self.os_hash_algo, self.os_hash_value = "sha512", hashlib.sha512(data).hexdigest()
        self.virtual_size, self.properties = None, {}


class _LocalClient:
    """Serves one image from memory, only to put the base in place before timing."""

    def __init__(self, image: _LocalImage, data: bytes) -> None:
        self.image, self.data = image, data

    def get(self, image_id: str) -> _LocalImage:
        return self.image

    @contextlib.contextmanager
    def open_download(self, image_id: str, *, offset: int = 0) -> Iterator[Any]:
        data = self.data

        class S:
            status, total_size = (206 if offset else 200), len(data)

            def iter_chunks(self, n: int = MiB) -> Iterator[bytes]:
                for i in range(offset, len(data), n):
                    yield data[i : i + n]

        s = S()
        s.offset = offset  # type: ignore[attr-defined]
        yield s


@contextlib.contextmanager
def _forbidden() -> Iterator[None]:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the hit path started a subprocess or opened a socket")

    saved = (subprocess.Popen.__init__, socket.socket.connect)
    subprocess.Popen.__init__ = refuse  # type: ignore[assignment,method-assign]
    socket.socket.connect = refuse  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__, socket.socket.connect = saved  # type: ignore[method-assign]


def _median_ms(fn: Any, runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--runs", type=int, default=5000)
    args = ap.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="cowfleet-bench-hit-"))
    try:
        data = os.urandom(4 * MiB) + bytes(60 * MiB)
        iid = str(uuid.uuid4())
        cfg = Config(home=wd, instances_path=wd / "inst")
        client = _LocalClient(_LocalImage(iid, data), data)
        cache = ImageCache(cfg, client)  # type: ignore[arg-type]
        base = cache.ensure_cached(iid)
        assert base.fetched
        meta = next((cfg.base_dir / ".cowfleet").glob("*.json"))

        def floor() -> None:
            os.stat(base.path)
            json.loads(meta.read_bytes())

        def hit() -> None:
            assert not cache.ensure_cached(iid).fetched

        # a fresh cache object: nothing memoised in-process
        cold_obj = ImageCache(cfg, lambda: (_ for _ in ()).throw(AssertionError("client")))
        with _forbidden():
            floor_ms = _median_ms(floor, args.runs)
            hit_ms = _median_ms(hit, args.runs)
            first = _median_ms(lambda: cold_obj.ensure_cached(iid), 1)
        qemu = shutil.which("qemu-img")
        qemu_ms = (
            _median_ms(
                lambda: subprocess.run(
                    [qemu, "info", "-f", "raw", "--output=json", str(base.path)],
                    check=True,
                    capture_output=True,
                ),
                50,
            )
            if qemu
            else float("nan")
        )
        print(
            f"{os.cpu_count()} cores, load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
        )
        print(
            f"ensure_cached hit       median {hit_ms:7.3f} ms  (target <= 1 ms, "
            f"no subprocess, no socket)"
        )
        print(f"first hit, new object          {first:7.3f} ms")
        print(f"floor: stat + json read median {floor_ms:7.3f} ms")
        print(
            f"qemu-img info (per boot, Nova) median {qemu_ms:7.3f} ms  "
            f"-> hit is {qemu_ms / hit_ms:.0f}x faster"
        )
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
