"""Image server throughput with curl over loopback, against baselines from the same run.

    python3 bench/image_server_curl.py [--size-mib 1024] [--file PATH] [--buffered]
        [--cache-min-uses N]

Starts a real ``cowfleet serve images`` (SQLite, own temp data dir), then:
- upload: ``curl -T`` of a random raw image (md5 + sha512 + inspection + fsync on the
  server) vs. the same curl upload into a plain socket sink (the client-side ceiling);
- download: ``curl -o /dev/null`` of the image (first, right after the upload, and the
  best of two more; by default the first is read from disk, the second fills the page
  cache, the third is served from it) vs. ``curl file://`` of the same file;
- the server's CPU seconds per GiB for each (from /proc: less noisy than wall clock on
  a shared machine), its peak RSS (VmHWM) after the transfers, and ``uptime``.
Prints one line per figure; needs ``curl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

MiB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def curl(*args: str) -> tuple[str, float]:
    out = subprocess.run(
        ["curl", "-s", "-S", "-w", "%{http_code} %{time_total}", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[-2], float(out[-1])


def sink_upload(path: Path) -> float:
    """curl -T into a socket that only drains: what curl itself can push."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    size = path.stat().st_size

    def drain() -> None:
        conn, _ = srv.accept()
        buf = bytearray(MiB)
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        got = len(head.split(b"\r\n\r\n", 1)[1])
        while got < size:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        conn.close()

    t = threading.Thread(target=drain)
    t.start()
    _, seconds = curl(
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "-T",
        str(path),
        "-o",
        "/dev/null",
        f"http://127.0.0.1:{port}/",
    )
    t.join()
    srv.close()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--file", type=Path, help="existing raw file to use instead of random data")
    ap.add_argument(
        "--buffered",
        action="store_true",
        help="serve with images_direct_io off (uploads written through the page cache)",
    )
    ap.add_argument(
        "--cache-min-uses",
        type=int,
        metavar="N",
        help="serve with images_cache_min_uses N (1: every download keeps the image cached)",
    )
    args = ap.parse_args()
    if shutil.which("curl") is None:
        print("curl is required", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cowfleet-bench-images-"))
    proc = None
    try:
        image = args.file or work / "image.raw"
        if args.file is None:
            with image.open("wb") as fh:
                for _ in range(args.size_mib):
                    fh.write(os.urandom(MiB))
        size = image.stat().st_size
        mb = size / 1e6
        port = free_port()
        data = work / "service"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
        env["COWFLEET_HOME"] = str(work / "home")
        if args.buffered:
            env["COWFLEET_IMAGES_DIRECT_IO"] = "false"
        if args.cache_min_uses is not None:
            env["COWFLEET_IMAGES_CACHE_MIN_USES"] = str(args.cache_min_uses)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cowfleet",
                "serve",
                "images",
                "--port",
                str(port),
                "--data-dir",
                str(data),
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/versions", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        token = (data / "token").read_text().strip()
        auth = f"X-Auth-Token: {token}"
        req = urllib.request.Request(
            f"{url}/v2/images",
            method="POST",
            data=json.dumps(
                {"name": "bench", "disk_format": "raw", "container_format": "bare"}
            ).encode(),
            headers={"X-Auth-Token": token, "Content-Type": "application/json"},
        )
        image_id = json.load(urllib.request.urlopen(req))["id"]

        print(f"before: {uptime()}; {os.cpu_count()} CPUs, image {size / MiB:.0f} MiB")
        gib = size / (1 << 30)
        base_up = sink_upload(image)
        c0 = cpu_seconds(proc.pid)
        code, up = curl(
            "-X",
            "PUT",
            "-H",
            auth,
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
            str(image),
            "-o",
            "/dev/null",
            f"{url}/v2/images/{image_id}/file",
        )
        assert code == "204", code
        up_cpu = (cpu_seconds(proc.pid) - c0) / gib
        print(
            f"upload   cowfleet {mb / up:7.0f} MB/s ({up:.2f} s, server {up_cpu:.2f} CPU-s/GiB)"
            f"  curl->sink {mb / base_up:7.0f} MB/s  ratio {base_up / up:.2f}"
        )
        _, base_down = curl("-o", "/dev/null", f"file://{image}")
        downs, cpus = [], []
        for _ in range(3):
            c0 = cpu_seconds(proc.pid)
            code, t = curl("-H", auth, "-o", "/dev/null", f"{url}/v2/images/{image_id}/file")
            assert code == "200", code
            downs.append(t)
            cpus.append((cpu_seconds(proc.pid) - c0) / gib)
        down = min(downs[1:])
        print(
            f"download cowfleet first {mb / downs[0]:7.0f} MB/s (server {cpus[0]:.2f} CPU-s/GiB)"
            f", best of 2 more {mb / down:7.0f} MB/s (server {min(cpus[1:]):.2f} CPU-s/GiB)"
            f"  curl file:// {mb / base_down:7.0f} MB/s  ratio {base_down / down:.2f}"
        )
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        print(f"server peak RSS: {int(hwm.split()[1]) / 1024:.0f} MiB")
        print(f"after: {uptime()}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
