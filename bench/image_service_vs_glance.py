"""The embedded image service against real Glance 33, same 1 GiB image, same run.

For each server: upload through cowfleet's client (MB/s), download over loopback to
/dev/null with curl and with cowfleet's client (raw stream), and cowfleet's verified
download to a file (sha512 while streaming, fsync, rename). Also the embedded
server's peak RSS (VmHWM). Prints a table, the ratios and the issue's targets:
upload >= 300 MB/s and >= 2x Glance; download >= 1 GB/s and not slower than Glance;
server peak RSS <= 150 MiB.

Needs ``COWFLEET_TEST_GLANCE_VENV`` (scripts/setup/glance.sh) and curl. Run from the
repository root: ``python3 bench/image_service_vs_glance.py [--size-mib 1024]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.glance import start_glance  # noqa: E402
from tests.fixtures.images import start_image_service  # noqa: E402

from cowfleet.images.client import ImageClient  # noqa: E402

MiB = 1024 * 1024


def make_image(path: Path, size: int) -> None:
    """Incompressible, no zero runs: 16 MiB random blocks, each varied by its index."""
    block = bytearray(os.urandom(16 * MiB))
    with path.open("wb") as fh:
        done, i = 0, 0
        while done < size:
            block[:8] = i.to_bytes(8, "little")
            n = min(len(block), size - done)
            fh.write(block[:n])
            done, i = done + n, i + 1


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def curl_download(url: str, token: str | None) -> float:
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{speed_download}"]
    if token:
        argv += ["-H", f"X-Auth-Token: {token}"]
    out = subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout
    return float(out) / 1e6


def curl_upload(url: str, token: str | None, image: Path) -> float:
    """The baseline for the client's upload: curl PUT with Content-Length (no
    ``Expect: 100-continue``, which uWSGI leaves unanswered: curl then waits 1 s)."""
    argv = [
        "curl",
        "-sS",
        "--fail",
        "-o",
        "/dev/null",
        "-w",
        "%{speed_upload}",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "-H",
        "Expect:",
        "--upload-file",
        str(image),
    ]
    if token:
        argv += ["-H", f"X-Auth-Token: {token}"]
    out = subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout
    return float(out) / 1e6


def bench_server(
    label: str, url: str, token: str | None, image: Path, size: int, scratch: Path
) -> dict[str, float]:
    res: dict[str, float] = {}
    with ImageClient(url, token, timeout=120.0) as client:
        rec = client.create(name=f"bench-{label}", disk_format="raw", container_format="bare")
        with image.open("rb") as fh:
            secs = timed(lambda: client.upload(rec.id, fh, size=size))
        res["upload"] = size / secs / 1e6
        file_url = f"{url}/v2/images/{rec.id}/file"
        other = client.create(
            name=f"bench-{label}-curl", disk_format="raw", container_format="bare"
        )
        res["curl_upload"] = curl_upload(f"{url}/v2/images/{other.id}/file", token, image)
        client.delete(other.id)
        res["curl"] = max(curl_download(file_url, token) for _ in range(2))

        def raw() -> None:
            with client.open_download(rec.id) as stream:
                for _chunk in stream.iter_chunks(4 * MiB):
                    pass

        res["client"] = max(size / timed(raw) / 1e6 for _ in range(2))
        dest = scratch / f"{label}.out"
        res["client_verified"] = size / timed(lambda: client.download(rec.id, dest)) / 1e6
        dest.unlink()
        client.delete(rec.id)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    venv = os.environ.get("COWFLEET_TEST_GLANCE_VENV")
    if not venv or shutil.which("curl") is None:
        print("needs COWFLEET_TEST_GLANCE_VENV (scripts/setup/glance.sh) and curl", file=sys.stderr)
        return 2
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="cowfleet-bench-") as tmp:
        work = Path(tmp)
        image = work / "image.raw"
        make_image(image, size)
        print(f"image: {size / MiB:.0f} MiB; load before: {os.getloadavg()}", flush=True)
        embedded = start_image_service(work / "embedded")
        glance = start_glance(Path(venv), work / "glance")
        try:
            rss_before = vm_hwm(embedded.pid)
            emb = bench_server("embedded", embedded.url, embedded.token, image, size, work)
            rss_peak = vm_hwm(embedded.pid)
            gl = bench_server("glance", glance.url, None, image, size, work)
        finally:
            embedded.stop()
            glance.stop()
    rows = [
        ("upload (cowfleet client)", "upload"),
        ("upload, curl PUT (baseline)", "curl_upload"),
        ("download, curl -> /dev/null", "curl"),
        ("download, client stream -> /dev/null", "client"),
        ("download, client verified -> file", "client_verified"),
    ]
    print(f"\n{'MB/s':40} {'embedded':>10} {'glance':>10} {'ratio':>7}")
    for title, key in rows:
        print(f"{title:40} {emb[key]:10.0f} {gl[key]:10.0f} {emb[key] / gl[key]:6.2f}x")
    print(
        f"\nembedded server peak RSS (VmHWM): {rss_peak / MiB:.0f} MiB "
        f"(after start: {rss_before / MiB:.0f} MiB)"
    )
    print(f"load after: {os.getloadavg()}")
    print(
        f"client upload / curl upload: embedded {emb['upload'] / emb['curl_upload']:.2f}, "
        f"glance {gl['upload'] / gl['curl_upload']:.2f}"
    )
    checks = [
        ("upload >= 300 MB/s", emb["upload"] >= 300),
        ("upload >= 2x Glance", emb["upload"] >= 2 * gl["upload"]),
        ("download (curl) >= 1000 MB/s", emb["curl"] >= 1000),
        ("download (curl) not slower than Glance", emb["curl"] >= gl["curl"]),
        ("server peak RSS <= 150 MiB", rss_peak <= 150 * MiB),
    ]
    print()
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
