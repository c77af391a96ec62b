"""Shared plumbing for the node cache benchmarks: a real image service and one image."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class Service:
    url: str
    token: str
    token_file: Path
    data_dir: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Settings of an image service whose images are always served from memory (uploads
# through the page cache, every download keeps the image): for benchmarks of the node.
SERVE_FROM_MEMORY = {
    "COWFLEET_IMAGES_DIRECT_IO": "false",
    "COWFLEET_IMAGES_CACHE_MIN_USES": "1",
}


@contextlib.contextmanager
def image_service(workdir: Path) -> Iterator[Service]:
    """``cowfleet serve images`` on a free loopback port (a real subprocess).

    These benchmarks measure the node: the server keeps every image in memory (uploads
    through the page cache, cached from the first download), so each run fetches from
    memory whatever its place in the run.
    """
    port = free_port()
    data = workdir / "service"
    data.mkdir(parents=True, exist_ok=True)
    token_file = data / "token"
    argv = [
        sys.executable,
        "-m",
        "cowfleet",
        "serve",
        "images",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data),
        "--token-file",
        str(token_file),
        "--home",
        str(workdir / "home"),
    ]
    env = {**os.environ, **SERVE_FROM_MEMORY}
    log = open(workdir / "service.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"image service exited; see {workdir / 'service.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                if token_file.exists():
                    break
            if time.monotonic() > deadline:
                raise SystemExit("image service did not start")
            time.sleep(0.1)
        yield Service(f"http://127.0.0.1:{port}", token_file.read_text().strip(), token_file, data)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def make_image_file(path: Path, size: int, zero_fraction: float = 0.25) -> None:
    """Random data with a run of zeros (a typical disk: data, then free space)."""
    data_bytes = int(size * (1 - zero_fraction))
    with open(path, "wb") as fh:
        left = data_bytes
        while left:
            n = min(left, 16 * MiB)
            fh.write(os.urandom(n))
            left -= n
        fh.truncate(size)


def upload(svc: Service, path: Path, disk_format: str = "raw") -> str:
    from cowfleet.images.client import ImageClient

    with ImageClient(svc.url, svc.token, timeout=300) as c:
        img = c.create(name=path.name, disk_format=disk_format, container_format="bare")
        with open(path, "rb") as fh:
            c.upload(img.id, fh, size=path.stat().st_size)
        return str(img.id)


@contextlib.contextmanager
def served_image(wd: Path, size: int) -> Iterator[tuple[Service, str]]:
    """:func:`image_service` in ``wd`` holding one raw image of ``size`` bytes (its id);
    the local copy is deleted once uploaded."""
    src = wd / "image.raw"
    make_image_file(src, size)
    with image_service(wd) as svc:
        image_id = upload(svc, src)
        src.unlink()
        yield svc, image_id


def workdir(arg: str | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="cowfleet-bench-", dir=arg))


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def fetch_argv(svc: Service, inst: Path, home: Path, image_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cowfleet",
        "cache",
        "fetch",
        image_id,
        "--output",
        "json",
        "--home",
        str(home),
        "--instances-path",
        str(inst),
        "--image-url",
        svc.url,
        "--token-file",
        str(svc.token_file),
    ]


# Child scripts the fetch benchmarks share (run as `python3 -c SCRIPT ARGS`).
# The digest alone over a file: argv FILE ALGO.
DIGEST_ALONE = r"""
import hashlib, sys
h = hashlib.new(sys.argv[2])
with open(sys.argv[1], "rb", buffering=0) as fh:
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        h.update(view[:n])
print(h.hexdigest())
"""

# A cold fetch of an image as if it had no hash tree (real Glance: the whole-image digest
# verifies it): argv URL TOKEN IMAGE_ID INSTANCES_PATH HOME; prints fetched and size.
FETCH_SHA512 = r"""
import json, sys
from pathlib import Path
from cowfleet.cache.cache import ImageCache
from cowfleet.config import Config
from cowfleet.hashtree import LEAF_SIZE_PROPERTY, ROOT_PROPERTY
from cowfleet.images.client import ImageClient
url, token, image_id, inst, home = sys.argv[1:6]

class NoTree(ImageClient):
    def get(self, image_id):
        image = super().get(image_id)
        for key in (ROOT_PROPERTY, LEAF_SIZE_PROPERTY):
            image.properties.pop(key, None)
        return image

cfg = Config(home=Path(home), instances_path=Path(inst), image_url=url)
with NoTree(url, token, timeout=300) as client:
    base = ImageCache(cfg, client).ensure_cached(image_id)
print(json.dumps({"fetched": base.fetched, "size": base.size}))
"""
