"""createImage's node work vs. ``qemu-img convert -O qcow2`` + ``curl -T``, in one run.

    python3 bench/snapshot.py [--size-mib 1024] [--base-data-mib 256] [--written-mib 64]
        [--base-content random|text|mixed] [--compress] [--libvirt URI]

Builds an instance disk: a raw base of ``--size-mib`` holding ``--base-data-mib`` of
random data (``--base-content``: or text-like lines, or both in turn) in 4 MiB pieces
spread over it, and a qcow2 overlay on it into which
``--written-mib`` were written (1 MiB writes spread over the disk). Starts a real
``cowfleet serve images`` (own temp data dir) and measures:

- cowfleet: ``qemu-img map`` + the streamed qcow2 (:mod:`cowfleet.compute.flatten`)
  uploaded as it is made (wall time, bytes uploaded);
- baseline: ``qemu-img convert -O qcow2`` of the chain to a file, then ``curl -T`` of
  that file (wall time of both, bytes uploaded);
- with ``--compress``: also ``snapshot_compression = zlib`` (:mod:`cowfleet.compute.compress`:
  deflate into a spool, then stream) vs. ``qemu-img convert -c -O qcow2`` + ``curl -T``;
- with ``--libvirt``: the test guest (``COWFLEET_TEST_GUEST_DIR``) runs on the disk, and
  the live flow is timed (disk-only external snapshot, stream, active commit + pivot):
  the guest's pause is the snapshot call plus the pivot; the domain's state is also
  polled every millisecond during the flow and any time not "running" is reported.

Prints each figure and its ratio to the baseline or target; the chain's allocated data
is what ``qemu-img map`` reports as data.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid as uuidlib
from pathlib import Path

from cowfleet.compute import compress, flatten
from cowfleet.images.client import ImageClient
from cowfleet.images.put_stream import prefetched, put_stream

MiB = 1024 * 1024


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


WORDS = b"the of and node disk image cluster qcow2 overlay base cache fleet snapshot".split()


def text_piece(rng: random.Random, size: int) -> bytes:
    """Log-like lines: numbers and words, compressible as real text is (about 4-6x)."""
    lines = []
    total = 0
    while total < size:
        line = b"%010d %s %s %s %08x\n" % (
            total,
            rng.choice(WORDS),
            rng.choice(WORDS),
            rng.choice(WORDS),
            rng.getrandbits(32),
        )
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def make_chain(
    work: Path, size_mib: int, base_mib: int, written_mib: int, content: str = "random"
) -> Path:
    base = work / "base.raw"
    rng = random.Random(17)
    with base.open("wb") as fh:
        fh.truncate(size_mib * MiB)
        pieces = max(1, base_mib // 4)
        step = size_mib * MiB // pieces
        for i in range(pieces):
            fh.seek(i * step)
            text = content == "text" or (content == "mixed" and i % 2 == 0)
            fh.write(text_piece(rng, 4 * MiB) if text else os.urandom(4 * MiB))
    top = work / "disk"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    step = size_mib * MiB // max(1, written_mib)
    cmds: list[str] = []
    for i in range(written_mib):
        cmds += ["-c", f"write -P {(i * 7) % 251 + 1} {i * step + step // 2} 1M"]
    for k in range(0, len(cmds), 64):
        run("qemu-io", "-f", "qcow2", *cmds[k : k + 64], str(top))
    return top


def start_service(work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    data = work / "service"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(work / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cowfleet", "serve", "images", "--port", str(port),
         "--data-dir", str(data)],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            urllib.request.urlopen(f"{url}/versions", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, url, (data / "token").read_text().strip()


def ours(client: ImageClient, token: str, top: Path) -> tuple[float, int, int]:
    image = client.create(name="snap", disk_format="qcow2", container_format="bare")
    t0 = time.monotonic()
    chain = flatten.chain_map(top)
    flat = flatten.plan(chain)
    put_stream(client.endpoint, token, image.id, prefetched(iter(flat.chunks(chain))), flat.size)
    wall = time.monotonic() - t0
    assert client.get(image.id).status == "active"
    return wall, flat.size, chain.allocated


def ours_compressed(
    client: ImageClient, token: str, top: Path, work: Path
) -> tuple[float, float, int]:
    """Wall time, of which the spool pass, and bytes uploaded, with zlib compression."""
    image = client.create(name="snapz", disk_format="qcow2", container_format="bare")
    spool = work / "disk.spool"
    t0 = time.monotonic()
    chain = flatten.chain_map(top)
    flat = compress.compress(chain, spool_path=spool)
    t_spool = time.monotonic() - t0
    try:
        put_stream(client.endpoint, token, image.id, prefetched(iter(flat.chunks())), flat.size)
    finally:
        flat.close()
    wall = time.monotonic() - t0
    assert client.get(image.id).status == "active"
    assert not spool.exists()
    return wall, t_spool, flat.size


def baseline(
    client: ImageClient, url: str, token: str, top: Path, work: Path, compressed: bool = False
) -> tuple[float, int]:
    image = client.create(name="baseline", disk_format="qcow2", container_format="bare")
    out = work / "converted.qcow2"
    t0 = time.monotonic()
    c = ["-c"] if compressed else []
    run("qemu-img", "convert", *c, "-f", "qcow2", "-O", "qcow2", str(top), str(out))
    code = subprocess.run(
        ["curl", "-s", "-S", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT",
         "-H", f"X-Auth-Token: {token}", "-H", "Content-Type: application/octet-stream",
         "-T", str(out), f"{url}/v2/images/{image.id}/file"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    wall = time.monotonic() - t0
    assert code == "204", code
    size = out.stat().st_size
    out.unlink()
    return wall, size


def live(client: ImageClient, token: str, uri: str, top: Path) -> None:
    from cowfleet.compute.drivers.libvirt import LibvirtDriver

    guest = Path(os.environ.get("COWFLEET_TEST_GUEST_DIR", "/opt/cowfleet-test/guest"))
    uuid = str(uuidlib.uuid4())
    virt = os.environ.get("COWFLEET_TEST_VIRT_TYPE", "qemu")
    xml = f"""<domain type='{virt}'><name>cowfleet-bench-snap-{uuid[:8]}</name><uuid>{uuid}</uuid>
<memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{guest}/vmlinuz</kernel>
<initrd>{guest}/initramfs.img</initrd><cmdline>console=ttyS0 quiet cowfleet.hold=3600</cmdline></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='{top}'/><target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='{top.parent}/console.log'/></serial></devices></domain>"""
    drv = LibvirtDriver(uri)
    conn = drv._connection()
    dom = conn.createXML(xml, 0)
    try:
        console = top.parent / "console.log"
        deadline = time.monotonic() + 300
        while "marker written" not in (console.read_text(errors="replace") if console.exists()
                                       else ""):  # fmt: skip
            if time.monotonic() > deadline:
                raise SystemExit("the test guest did not write its marker in 300 s")
            time.sleep(0.5)
        not_running = 0.0
        stop = threading.Event()

        def watch() -> None:
            nonlocal not_running
            last = time.monotonic()
            while not stop.is_set():
                state = dom.state()[0]
                now = time.monotonic()
                if state != 1:
                    not_running += now - last
                last = now
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        overlay = top.parent / "disk.snap"
        image = client.create(name="live", disk_format="qcow2", container_format="bare")
        t0 = time.monotonic()
        snap = drv.disk_snapshot(uuid, "vda", overlay)
        chain = flatten.chain_map(top)
        flat = flatten.plan(chain)
        put_stream(
            client.endpoint, token, image.id, prefetched(iter(flat.chunks(chain))), flat.size
        )
        pivot = drv.commit_back(uuid, "vda", overlay)
        wall = time.monotonic() - t0
        stop.set()
        watcher.join()
        pause = (snap + pivot) * 1000
        print(
            f"live     wall {wall:6.2f} s  snapshot call {snap * 1000:6.1f} ms  "
            f"pivot {pivot * 1000:6.1f} ms  pause {pause:6.1f} ms (target 100 ms, ratio "
            f"{pause / 100:.2f})  domain not running for {not_running * 1000:.1f} ms  "
            f"still {('running' if dom.state()[0] == 1 else dom.state())}"
        )
    finally:
        dom.destroy()
        drv.close()


def compressed(
    client: ImageClient, url: str, token: str, top: Path, work: Path, rounds: int, allocated: int
) -> None:
    z_walls, zb_walls, spools = [], [], []
    for _ in range(rounds):
        zb_wall, zb_bytes = baseline(client, url, token, top, work, compressed=True)
        z_wall, z_spool, z_bytes = ours_compressed(client, token, top, work)
        zb_walls.append(zb_wall)
        z_walls.append(z_wall)
        spools.append(z_spool)
    z_wall, zb_wall = min(z_walls), min(zb_walls)
    print(
        f"zlib     wall {z_wall:6.2f} s (best of {rounds}: "
        f"{' '.join(f'{w:.2f}' for w in z_walls)}; spool pass "
        f"{' '.join(f'{w:.2f}' for w in spools)}, {compress.workers_for(0)} threads)  "
        f"bytes {z_bytes / MiB:8.1f} MiB ({z_bytes / allocated:.3f}x allocated)"
    )
    print(
        f"baseline wall {zb_wall:6.2f} s (best of {rounds}: "
        f"{' '.join(f'{w:.2f}' for w in zb_walls)})  bytes {zb_bytes / MiB:8.1f} MiB "
        f"(convert -c -O qcow2 + curl -T)  wall ratio ours/baseline {z_wall / zb_wall:.2f}  "
        f"bytes ratio {z_bytes / zb_bytes:.3f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--base-data-mib", type=int, default=256)
    ap.add_argument("--written-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base-content", choices=("random", "text", "mixed"), default="random")
    ap.add_argument(
        "--compress",
        action="store_true",
        help="also time snapshot_compression = zlib vs. qemu-img convert -c + curl",
    )
    ap.add_argument("--libvirt", metavar="URI", help="also time the live flow on this libvirt")
    args = ap.parse_args()
    for prog in ("curl", "qemu-img", "qemu-io"):
        if shutil.which(prog) is None:
            print(f"{prog} is required", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-snap-", dir="/var/tmp"))
    work.chmod(0o755)
    proc = None
    try:
        top = make_chain(
            work, args.size_mib, args.base_data_mib, args.written_mib, args.base_content
        )
        proc, url, token = start_service(work)
        print(f"before: {uptime()}; {os.cpu_count()} CPUs")
        with ImageClient(url, token) as client:
            b_walls, o_walls = [], []
            for _ in range(args.rounds):  # alternate: neither side always runs first
                b_wall, b_bytes = baseline(client, url, token, top, work)
                o_wall, o_bytes, allocated = ours(client, token, top)
                b_walls.append(b_wall)
                o_walls.append(o_wall)
            b_wall, o_wall = min(b_walls), min(o_walls)
            print(
                f"chain    {args.size_mib} MiB virtual, base data {args.base_data_mib} MiB, "
                f"written {args.written_mib} MiB, "
                f"allocated (qemu-img map) {allocated / MiB:.1f} MiB"
            )
            print(
                f"stream   wall {o_wall:6.2f} s (best of {args.rounds}: "
                f"{' '.join(f'{w:.2f}' for w in o_walls)})  bytes {o_bytes / MiB:8.1f} MiB "
                f"({o_bytes / allocated:.3f}x allocated, target 1.1)"
            )
            print(
                f"baseline wall {b_wall:6.2f} s (best of {args.rounds}: "
                f"{' '.join(f'{w:.2f}' for w in b_walls)})  bytes {b_bytes / MiB:8.1f} MiB "
                f"(convert -O qcow2 + curl -T)  wall ratio ours/baseline {o_wall / b_wall:.2f}"
            )
            if args.compress:
                compressed(client, url, token, top, work, args.rounds, allocated)
            if args.libvirt:
                live(client, token, args.libvirt, top)
        print(f"after: {uptime()}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
