"""Benchmark: warm provisioning (base cached) vs ``qemu-img create`` of the same disks.

Same run, same directory, same bases. Per instance:

* cowfleet (in-process, none driver): ``ImageCache.ensure_cached`` (a hit) plus
  ``Provisioner.build`` — root, ephemeral and swap qcow2 overlays, ``disk.info``,
  ``console.log``, ``instance.json``, name claim, atomic rename; the image base is
  re-inspected; with fsync (the default: every file and the folder made durable
  before the folder is renamed into place, then the rename made durable) and without;
* baseline: three ``qemu-img create -f qcow2 -F raw -b BASE OUT SIZE`` subprocesses
  (root, ephemeral, swap), what Nova runs per disk. qemu-img does fdatasync the image
  (5 times per create, audited with strace when installed and printed), writes it in
  place under its final name and does not fsync the directory.

Also prints the whole ``Provisioner.create``: once with the image records looked up
over HTTP, and once with them served from memory (validation, base pins when the
provisioner takes them, ensure_cached, build: the whole in-process warm path).
The image comes from a real ``cowfleet serve images`` on loopback.
Prints ``uptime`` before and after, and a filesystem probe (bare create, flush-only
fdatasync): on this shared VM both vary several-fold from minute to minute.

    python3 bench/provision_warm.py [--instances 50] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _cache_common import SERVE_FROM_MEMORY
from cowfleet import config
from cowfleet.cache import ImageCache
from cowfleet.compute.drivers.none import NoneDriver
from cowfleet.compute.provision import Provisioner
from cowfleet.images.client import Image, ImageClient
from overlay_create import audit_qemu_img, probe_fs, uptime

MIB = 1024**2
GIB = 1024**3
FLAVOR = """
[flavors.b1.full]
vcpus = 1
ram_mb = 512
root_gb = 20
ephemeral_gb = 1
swap_mb = 512
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def image_service(work: Path) -> Iterator[tuple[str, str]]:
    """A real ``cowfleet serve images`` on loopback; yields (url, token)."""
    port = _free_port()
    data = work / "service"
    token_file = data / "token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(work / "service-home")
    # These benchmarks measure the node: every fetch is served from memory.
    env.update(SERVE_FROM_MEMORY)
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
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"image service exited: {err}")
            if token_file.exists():
                token = token_file.read_text().strip()
                try:
                    with ImageClient(url, token, timeout=2) as c:
                        list(c.list())
                    break
                except Exception:
                    pass
            if time.monotonic() > deadline:
                raise SystemExit("image service did not start within 30 s")
            time.sleep(0.1)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def upload_raw(client: ImageClient, name: str, path: Path) -> str:
    image = client.create(name=name, disk_format="raw", container_format="bare")
    with path.open("rb") as fh:
        client.upload(image.id, fh, size=path.stat().st_size)
    return image.id


def make_config(home: Path, url: str, token: str) -> config.Config:
    cfgfile = home.parent / f"{home.name}.toml"
    cfgfile.write_text(FLAVOR)
    return config.load(
        cfgfile,
        env={
            "COWFLEET_HOME": str(home),
            "COWFLEET_DRIVER": "none",
            "COWFLEET_IMAGE_URL": url,
            "COWFLEET_IMAGE_TOKEN": token,
        },
    )


class MemoryLookup:
    """Image records fetched once over HTTP, then served from memory."""

    def __init__(self, client: ImageClient) -> None:
        self.client = client
        self.records: dict[str, Image] = {}

    def find(self, name_or_id: str) -> Image:
        if name_or_id not in self.records:
            self.records[name_or_id] = self.client.find(name_or_id)
        return self.records[name_or_id]

    def get(self, image_id: str) -> Image:
        if image_id not in self.records:
            self.records[image_id] = self.client.get(image_id)
        return self.records[image_id]


def _fmt(samples: list[float]) -> str:
    med = statistics.median(samples) * 1000
    p90 = sorted(samples)[int(len(samples) * 0.9)] * 1000
    return f"median {med:8.3f} ms   p90 {p90:8.3f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--instances", type=int, default=50)
    ap.add_argument("--image-mib", type=int, default=64, help="size of the raw test image")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        print("qemu-img not installed: no baseline", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-warm-", dir=args.dir))
    load_before = uptime()
    try:
        img = work / "image.raw"
        with img.open("wb") as fh:
            fh.truncate(args.image_mib * MIB)
            fh.write(os.urandom(MIB))
        with image_service(work) as (url, token), ImageClient(url, token) as client:
            image_id = upload_raw(client, "bench-warm", img)
            cfg = make_config(work / "node", url, token)
            cache = ImageCache(cfg, client)
            root = cache.ensure_cached(image_id)  # cold, not timed
            runs = args.instances
            durable = Provisioner(cfg, images=client, cache=cache, driver=NoneDriver())
            loose = Provisioner(cfg, images=client, cache=cache, driver=NoneDriver(), durable=False)
            memory = Provisioner(cfg, images=MemoryLookup(client), cache=cache, driver=NoneDriver())
            durable.create("warmup", image_id, "b1.full")  # makes the ephemeral/swap bases
            memory.create("warmup-memory", image_id, "b1.full")
            eph = next(cfg.base_dir.glob("ephemeral_*"))
            swap = next(cfg.base_dir.glob("swap_*"))
            qdir = work / "qemu-img"
            qdir.mkdir()
            audit = audit_qemu_img(qemu_img, root.path, qdir)
            probe = probe_fs(work)

            def qemu_three(i: int) -> None:
                for out, base, size in (
                    (f"disk{i}", root.path, 20 * GIB),
                    (f"disk{i}.local", eph, GIB),
                    (f"disk{i}.swap", swap, 512 * MIB),
                ):
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
                            str(qdir / out),
                            str(size),
                        ],
                        check=True,
                    )

            t_dur: list[float] = []
            t_loose: list[float] = []
            t_qemu: list[float] = []
            t_create: list[float] = []
            t_memory: list[float] = []
            # Interleaved so every series sees the same machine load.
            for i in range(runs):
                for prov, series, tag in ((durable, t_dur, "d"), (loose, t_loose, "l")):
                    plan = prov.plan(f"{tag}{i}", image_id, "b1.full")  # untimed: HTTP lookup
                    t0 = time.perf_counter()
                    base = cache.ensure_cached(image_id)
                    prov.build(plan, base)
                    series.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                qemu_three(i)
                t_qemu.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                durable.create(f"c{i}", image_id, "b1.full")
                t_create.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                memory.create(f"m{i}", image_id, "b1.full")
                t_memory.append(time.perf_counter() - t0)
            durable.close()
            loose.close()
            memory.close()
        m_q = statistics.median(t_qemu)
        m_d = statistics.median(t_dur)
        m_l = statistics.median(t_loose)
        m_c = statistics.median(t_create)
        m_m = statistics.median(t_memory)
        print(
            f"warm provisioning: root 20 GiB + ephemeral 1 GiB (ext4) + swap 512 MiB, "
            f"{runs} instances per series, none driver, in {work}"
        )
        print(f"  qemu-img create x3 (baseline)              {_fmt(t_qemu)}")
        print(f"  cowfleet ensure_cached+build, fsync        {_fmt(t_dur)}   {m_q / m_d:6.1f}x")
        print(f"  cowfleet ensure_cached+build, no fsync     {_fmt(t_loose)}   {m_q / m_l:6.1f}x")
        print(f"  cowfleet Provisioner.create (HTTP lookup)  {_fmt(t_create)}   {m_q / m_c:6.1f}x")
        print(f"  cowfleet Provisioner.create (in memory)    {_fmt(t_memory)}   {m_q / m_m:6.1f}x")
        share = max(0.0, m_d - m_l) / m_d * 100 if m_d else 0.0
        print(f"  durability share of build: {share:.0f}% ({(m_d - m_l) * 1000:.3f} ms)")
        print(f"  per disk: {audit}")
        print(f"  {probe}")
        print("  targets: <= 3 ms per instance and >= 20x qemu-img create")
        print(f"  uptime before: {load_before}")
        print(f"  uptime after:  {uptime()}   cpus: {os.cpu_count()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
