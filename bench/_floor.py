"""The machine's physical floor for moving one file between processes on loopback,
and (:func:`bounds`) the disk and hashing bounds of landing N verified copies.

What a transfer needs at the least, with no Python on the data path: a stdlib threaded
HTTP server that answers every GET with the file through ``socket.sendfile`` (a kernel
copy out), and per receiver ``curl -s URL | tee FILE | openssl dgst -sha256 -r`` then ``sync FILE``
(a kernel copy in, one sha256 of every byte, a write to the page cache and an fsync);
with ``whole_digest`` a sha512 of every byte too, as a node fetching from peers runs.
``openssl dgst``, not coreutils ``sha256sum``: the latter does not use the CPU's SHA
extensions here (350 MB/s against openssl's and hashlib's 1.8 GB/s), so it would put
the floor above what the node agents' own sha256 costs.
CPU is counted with ``getrusage(RUSAGE_CHILDREN)``: the server and every pipeline are
children of this process and are waited for before it is read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import resource
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SERVER = r"""
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = sys.argv[1]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        with open(PATH, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(fh)

ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), H)
print("ready", flush=True)
srv.serve_forever()
"""


@dataclass(frozen=True)
class Floor:
    seconds: float  # start to the last pipeline done (fsync included)
    cpu: float  # CPU seconds of the server and every pipeline (user + system)
    count: int  # transfers
    size: int  # bytes each
    digests: tuple[str, ...]  # sha256 each pipeline printed

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.count * self.size / (1 << 30))

    @property
    def mbs_each(self) -> float:
        return self.size / self.seconds / 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def _serving(source: Path) -> Iterator[str]:
    """The sendfile server for ``source`` (a child process), yielding its URL."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(source), str(port)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("the sendfile server did not start")
        yield f"http://127.0.0.1:{port}/image"
    finally:
        server.terminate()
        server.wait()


def socket_cpu(source: Path, count: int) -> float:
    """CPU seconds (server and clients) of ``count`` concurrent transfers of ``source``
    over loopback into ``/dev/null``: the socket copies alone (``sendfile`` out, ``curl``
    in), nothing hashed or written."""
    cpu0 = _children_cpu()
    with _serving(source) as url:

        def one(_i: int) -> None:
            subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)

        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            list(pool.map(one, range(count)))
    return _children_cpu() - cpu0


def plain_transfers(source: Path, dests: list[Path], *, whole_digest: bool = False) -> Floor:
    """``len(dests)`` concurrent plain transfers of ``source`` (see the module doc);
    ``whole_digest``: each pipeline also runs ``openssl dgst -sha512`` over the bytes (a
    node fetching from peers checks the tree and the whole-image sha512)."""
    cpu0 = _children_cpu()
    with _serving(source) as url:

        def one(dest: Path) -> str:
            d = shlex.quote(str(dest))
            cmd = f"curl -sf {url} | tee {d} | openssl dgst -sha256 -r && sync {d}"
            if whole_digest:  # and the whole-image sha512 every node runs too, beside it
                cmd = (
                    f"curl -sf {url} | tee {d} | tee >(openssl dgst -sha512 -r >/dev/null) "
                    f"| openssl dgst -sha256 -r && sync {d}"
                )
            out = subprocess.run(["bash", "-c", cmd], capture_output=True, check=True)
            return out.stdout.split()[0].decode()

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(dests)) as pool:
            digests = tuple(pool.map(one, dests))
        seconds = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    for d in dests:
        d.unlink(missing_ok=True)
    return Floor(seconds, cpu, len(dests), source.stat().st_size, digests)


@dataclass(frozen=True)
class Bounds:
    """Two lower bounds of landing N verified copies on this machine, each measured alone.

    ``disk``: N copies written at once from the page cache, each with an fsync
    (``dd conv=fsync``): no network, no hashing, so no way to land N durable copies is
    faster. ``hashing``: one core's time for the sha256 and the sha512 of one copy
    (hashlib, from the page cache), times N, over every core: the digests every node
    must run, perfectly spread. ``cpu``: both, plus the socket copies of N loopback
    transfers into ``/dev/null`` (a node must receive, hash and write), their CPU
    seconds over every core.
    """

    disk: float
    hashing: float
    sha256_mbs: float  # one core, MB/s
    sha512_mbs: float
    disk_cpu: float = 0.0  # CPU seconds the N fsynced copies took (dd, user + system)
    socket_cpu: float = 0.0  # CPU seconds of N loopback transfers into /dev/null
    cores: int = 1

    @property
    def cpu(self) -> float:
        """The three jobs' CPU over every core: each node must receive its copy through
        a socket, hash it *and* write it; no serving to other nodes, no inspection, no
        policy, no bookkeeping is counted, and the cores are taken as perfectly shared."""
        return (self.hashing * self.cores + self.disk_cpu + self.socket_cpu) / self.cores

    @property
    def floor(self) -> float:
        return max(self.disk, self.hashing, self.cpu)


def _hash_seconds(source: Path, name: str) -> float:
    import hashlib

    h = hashlib.new(name)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with source.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return time.perf_counter() - t0


def bounds(source: Path, dests: list[Path]) -> Bounds:
    """The :class:`Bounds` of ``len(dests)`` copies of ``source`` (see its doc)."""
    import os

    size = source.stat().st_size
    _hash_seconds(source, "sha256")  # warm the page cache
    sha256 = min(_hash_seconds(source, "sha256") for _ in range(2))
    sha512 = min(_hash_seconds(source, "sha512") for _ in range(2))
    hashing = len(dests) * (sha256 + sha512) / (os.cpu_count() or 1)
    subprocess.run(["sync"], check=True)

    def one(dest: Path) -> None:
        subprocess.run(
            ["dd", f"if={source}", f"of={dest}", "bs=4M", "conv=fsync", "status=none"],
            check=True,
        )

    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(dests)) as pool:
        list(pool.map(one, dests))
    disk = time.perf_counter() - t0
    disk_cpu = _children_cpu() - cpu0
    for d in dests:
        d.unlink(missing_ok=True)
    return Bounds(
        disk,
        hashing,
        size / sha256 / 1e6,
        size / sha512 / 1e6,
        disk_cpu,
        socket_cpu(source, len(dests)),
        os.cpu_count() or 1,
    )
