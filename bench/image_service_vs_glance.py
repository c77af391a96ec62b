"""The embedded image service against real Glance 33, same 1 GiB image, same run.

For each server: upload through cowfleet's client and with curl PUT (MB/s, and the
server's CPU seconds per GiB from /proc, less noisy than wall clock on a shared
machine), download over loopback to /dev/null with curl (the first download right
after the upload, then two more, each shown, and the best of those two) and with
cowfleet's client (raw stream), and cowfleet's verified download to a file (sha512
while streaming, fsync, rename). Also each server's peak RSS (VmHWM, largest process of
the server) and ``uptime`` before and after. The embedded server runs twice: as
configured by default (uploads written with O_DIRECT; an image cached from its second
download on, so the first is read from disk, the second fills the page cache and the
third is served from it), and "buffered", the earlier default (uploads through the
page cache, every download keeps the image cached), for a before/after in one run.
Prints a table, the ratios and the issue's targets: upload >= 300 MB/s and >= 2x
Glance; download >= 1 GB/s and not slower than Glance; server peak RSS <= 150 MiB.
Each server starts after ``--settle`` seconds of quiet: on a VM that hands free memory
back to its host, memory freed a moment ago is cheap to fill again and memory freed a
while ago is not, so without the pause a server would profit from the one before.

Needs ``COWFLEET_TEST_GLANCE_VENV`` (scripts/setup/glance.sh) and curl. Run from the
repository root: ``python3 bench/image_service_vs_glance.py [--size-mib 1024]
[--no-buffered-variant] [--compare-src OLD_CHECKOUT/src]``.
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
from tests.fixtures.images import ImageService  # noqa: E402

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


TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (uWSGI runs a master and workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server's processes (all threads)."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def vm_hwm(pid: int) -> int:
    """The largest peak RSS among the server's processes."""
    peak = 0
    for p in tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    return peak


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


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
    label: str,
    url: str,
    token: str | None,
    pid: int,
    image: Path,
    size: int,
    scratch: Path,
    settle: float,
) -> dict[str, float]:
    res: dict[str, float] = {}
    # Memory freed by the run before (deleted images, a stopped server) is cheap to
    # reuse for a few seconds, then goes back to the host: start every server alike.
    time.sleep(settle)
    gib = size / (1 << 30)

    def measured(key: str, fn: Callable[[], object]) -> float:
        c0 = cpu_seconds(pid)
        secs = timed(fn)
        res[f"{key}_cpu"] = (cpu_seconds(pid) - c0) / gib
        return secs

    with ImageClient(url, token, timeout=120.0) as client:
        rec = client.create(name=f"bench-{label}", disk_format="raw", container_format="bare")
        with image.open("rb") as fh:
            secs = measured("upload", lambda: client.upload(rec.id, fh, size=size))
        res["upload"] = size / secs / 1e6
        file_url = f"{url}/v2/images/{rec.id}/file"
        first: list[float] = []
        measured("curl_first", lambda: first.append(curl_download(file_url, token)))
        res["curl_first"] = first[0]
        other = client.create(
            name=f"bench-{label}-curl", disk_format="raw", container_format="bare"
        )
        up: list[float] = []
        measured(
            "curl_upload",
            lambda: up.append(curl_upload(f"{url}/v2/images/{other.id}/file", token, image)),
        )
        res["curl_upload"] = up[0]
        client.delete(other.id)
        res["curl_2"] = curl_download(file_url, token)
        res["curl_3"] = curl_download(file_url, token)
        res["curl"] = max(res["curl_2"], res["curl_3"])

        def raw() -> None:
            with client.open_download(rec.id) as stream:
                for _chunk in stream.iter_chunks(4 * MiB):
                    pass

        res["client"] = max(size / timed(raw) / 1e6 for _ in range(2))
        dest = scratch / f"{label}.out"
        res["client_verified"] = size / timed(lambda: client.download(rec.id, dest)) / 1e6
        dest.unlink()
        client.delete(rec.id)
    res["rss"] = vm_hwm(pid) / MiB
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument(
        "--no-buffered-variant",
        action="store_true",
        help="skip the embedded run with the earlier default (buffered uploads, "
        "every download cached)",
    )
    ap.add_argument(
        "--compare-src",
        type=Path,
        metavar="DIR",
        help="also run the embedded server from another checkout's src/ directory "
        "(e.g. `git archive OLD src | tar -x -C /tmp/old`) for a before/after in one run",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds to wait before each server's transfers, so that memory freed by the "
        "run before has gone back to the host (default 15)",
    )
    args = ap.parse_args()
    venv = os.environ.get("COWFLEET_TEST_GLANCE_VENV")
    if not venv or shutil.which("curl") is None:
        print("needs COWFLEET_TEST_GLANCE_VENV (scripts/setup/glance.sh) and curl", file=sys.stderr)
        return 2
    size = args.size_mib * MiB
    variants: dict[str, dict[str, str]] = {}
    if args.compare_src:
        pythonpath = str(args.compare_src.resolve())
        variants["compared"] = {"PYTHONPATH": pythonpath}
    variants["embedded"] = {}
    if not args.no_buffered_variant:
        variants["buffered"] = {
            "COWFLEET_IMAGES_DIRECT_IO": "false",
            "COWFLEET_IMAGES_CACHE_MIN_USES": "1",
        }
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cowfleet-bench-") as tmp:
        work = Path(tmp)
        image = work / "image.raw"
        make_image(image, size)
        print(f"image: {size / MiB:.0f} MiB; before: {uptime()}", flush=True)
        for name, settings in variants.items():
            svc = ImageService(work / name, settings=settings)
            svc.start()
            try:
                results[name] = bench_server(
                    name, svc.url, svc.token, svc.pid, image, size, work, args.settle
                )
            finally:
                svc.stop()
            print(f"{name} done; {uptime()}", flush=True)
        glance = start_glance(Path(venv), work / "glance")
        try:
            results["glance"] = bench_server(
                "glance", glance.url, None, glance.pid, image, size, work, args.settle
            )
        finally:
            glance.stop()
        print(f"glance done; after: {uptime()}", flush=True)
    gl = results["glance"]
    ours = [n for n in results if n != "glance"]
    rows = [
        ("upload, cowfleet client (MB/s)", "upload"),
        ("  server CPU-s/GiB", "upload_cpu"),
        ("upload, curl PUT (MB/s)", "curl_upload"),
        ("  server CPU-s/GiB", "curl_upload_cpu"),
        ("download, curl, first after upload", "curl_first"),
        ("  server CPU-s/GiB", "curl_first_cpu"),
        ("download, curl, 2nd", "curl_2"),
        ("download, curl, 3rd", "curl_3"),
        ("download, curl, best of 2nd, 3rd", "curl"),
        ("download, client stream, best of 2", "client"),
        ("download, client verified -> file", "client_verified"),
        ("server peak RSS (MiB)", "rss"),
    ]
    head = "".join(f"{n:>10}" for n in [*ours, "glance"])
    ratios = "".join(f"{n[:7] + '/gl':>11}" for n in ours)
    print(f"\n{'':38}{head}{ratios}")
    for title, key in rows:
        vals = "".join(f"{results[n][key]:10.{2 if 'cpu' in key else 0}f}" for n in ours)
        rat = "".join(f"{results[n][key] / gl[key]:10.2f}x" for n in ours)
        print(f"{title:38}{vals}{gl[key]:10.{2 if 'cpu' in key else 0}f}{rat}")
    for name in ours:
        emb = results[name]
        checks = [
            ("upload (client) >= 300 MB/s", emb["upload"] >= 300),
            ("upload (client) >= 2x Glance", emb["upload"] >= 2 * gl["upload"]),
            ("download (curl, best) >= 1000 MB/s", emb["curl"] >= 1000),
            ("download (curl, best) not slower than Glance", emb["curl"] >= gl["curl"]),
            ("download (curl, first) >= 1000 MB/s", emb["curl_first"] >= 1000),
            (
                "download (curl, first) not slower than Glance",
                emb["curl_first"] >= gl["curl_first"],
            ),
            ("server peak RSS <= 150 MiB", emb["rss"] <= 150),
        ]
        print(f"\n{name}:")
        for title, ok in checks:
            print(f"  {'PASS' if ok else 'MISS'}  {title}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
