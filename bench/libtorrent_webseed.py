"""Benchmark (comparison): libtorrent with a web seed, the shape of bench/peer_fetch.py.

NOT a cowfleet dependency: run it with a Python that has libtorrent
(``python3 -m venv /tmp/lt && /tmp/lt/bin/pip install libtorrent``), e.g.
``/tmp/lt/bin/python bench/libtorrent_webseed.py --nodes 4 --size-mib 64``.

Same run: a web seed on loopback (a Range-capable HTTP server written here, its link
capped at ``--origin-mbs`` for all requests together, as the counting proxy of
bench/peer_fetch.py caps the image service), then

* baseline 1: one libtorrent session downloading from the web seed alone;
* swarm: N sessions (127.0.0.x, connected to each other) downloading at once.

Reported: time until every session holds every piece (libtorrent's own piece hash
check), the ratio to baseline 1, and the web seed's egress in images. The sessions do
not run cowfleet's digest, inspector or policy: this measures the transport alone.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import libtorrent as lt  # type: ignore[import-not-found]

MiB = 1024 * 1024
RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class Seed:
    """A web seed serving one file with Range, all answers sharing one capped link."""

    def __init__(self, path: Path, rate: float) -> None:
        self.data = path.read_bytes()
        self.name = path.name
        self.rate = rate
        self.sent = 0
        self.lock = threading.Lock()
        self._next = 0.0
        seed = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                m = RANGE.match(self.headers.get("Range", ""))
                size = len(seed.data)
                first = int(m.group(1)) if m else 0
                last = int(m.group(2)) if m and m.group(2) else size - 1
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Length", str(last + 1 - first))
                self.end_headers()
                pos = first
                try:
                    while pos <= last:
                        end = min(pos + 65536, last + 1)
                        seed.pace(end - pos)
                        self.wfile.write(seed.data[pos:end])
                        pos = end
                except (BrokenPipeError, ConnectionResetError):
                    return  # the session dropped the request (it had the piece elsewhere)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pace(self, n: int) -> None:
        with self.lock:
            self.sent += n
            start = max(time.monotonic(), self._next)
            self._next = start + n / self.rate
            until = self._next
        time.sleep(max(0.0, until - time.monotonic()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{self.name}"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(n: int, info: Any, work: Path, first_ip: int) -> float:
    sessions, handles, addrs = [], [], []
    for i in range(n):
        ip, port = f"127.0.0.{first_ip + i}", _port()
        ses = lt.session(
            {
                "listen_interfaces": f"{ip}:{port}",
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "allow_multiple_connections_per_ip": True,
                "outgoing_interfaces": ip,
            }
        )
        save = work / f"node-{first_ip + i}"
        save.mkdir()
        handles.append(ses.add_torrent({"ti": info, "save_path": str(save)}))
        sessions.append(ses)
        addrs.append((ip, port))
    t0 = time.perf_counter()
    for h in handles:
        for addr in addrs:
            h.connect_peer(addr)
    while not all(h.status().is_seeding for h in handles):
        time.sleep(0.02)
    took = time.perf_counter() - t0
    for ses, h in zip(sessions, handles, strict=True):
        ses.remove_torrent(h)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--origin-mbs", type=float, default=100.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cowfleet-lt-"))
    try:
        src = work / "image.raw"
        src.write_bytes(os.urandom(args.size_mib * MiB))
        seed = Seed(src, args.origin_mbs * 1e6)
        fs = lt.file_storage()
        lt.add_files(fs, str(src))
        ct = lt.create_torrent(fs, 4 * MiB)
        ct.add_url_seed(seed.url)
        lt.set_piece_hashes(ct, str(work))
        info = lt.torrent_info(ct.generate())
        size = args.size_mib * MiB
        one = run(1, info, work, 100)
        one_egress = seed.sent / size
        seed.sent = 0
        swarm = run(args.nodes, info, work, 110)
        print(
            f"libtorrent {lt.__version__}, web seed capped at {args.origin_mbs:g} MB/s, "
            f"{args.size_mib} MiB, 4 MiB pieces; load {os.getloadavg()[0]:.1f}"
        )
        print(f"baseline 1, one session from the web seed: {one:.2f} s ({one_egress:.2f} images)")
        print(
            f"swarm, {args.nodes} sessions at once: {swarm:.2f} s ({swarm / one:.2f}x baseline "
            f"1), web seed egress {seed.sent / size:.2f} images"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
