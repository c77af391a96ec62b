"""Compressed qcow2 snapshots: deflate the chain's data clusters into a spool, then stream.

The plain qcow2 stream (:mod:`cowfleet.compute.flatten`) and raw need no temporary
copy: where every cluster lands is known from the allocation map alone, so the tables
go out first and the data follows. A compressed cluster's place depends on the length
of every compressed payload before it, and the tables that point at them come first
in the file: so the lengths must all be known before the first byte is sent. Hence
two passes:

1. the chain's data clusters are read (4 MiB batches, as the plain stream does) and
   deflated in worker threads (raw deflate, 4 KiB window, as qcow2's zlib type wants;
   zlib releases the GIL), the payloads written in guest order to a **spool**: memory
   when the chain holds little data, else a file beside the disk (0600, created
   exclusively, removed when the job ends however it ends, and by the agent's restart
   recovery). A cluster that does not shrink is spooled as it is and stored plain.
2. :func:`cowfleet.formats.qcow2_stream.plan` lays the file out from the payload
   lengths; the tables go out, then the compressed payloads packed, then the plain
   clusters, all read back from the spool. The size is known before the upload.

The spool holds at most the chain's allocated bytes (less what compression saved).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cowfleet.compute import flatten
from cowfleet.errors import LocalIOError, StorageFullError, UsageError
from cowfleet.formats import qcow2_stream

COMPRESSIONS = ("none", "zlib")
LEVEL = 6  # zlib's default: most of the gain of 9 at a fraction of its time
WINDOW_BITS = -12  # raw deflate with a 4 KiB window: what qcow2's zlib type reads
SPOOL_IN_MEMORY = 32 * 1024 * 1024  # chains holding at most this much data spool to memory
BATCH = flatten.BATCH


def deflate(cluster: bytes | bytearray | memoryview, level: int = LEVEL) -> bytes:
    """A cluster's payload: its raw deflate if that is shorter, else the cluster itself."""
    c = zlib.compressobj(level, zlib.DEFLATED, WINDOW_BITS)
    out = c.compress(cluster) + c.flush()
    return out if len(out) < len(cluster) else bytes(cluster)


def _deflate_batch(buf: bytearray, cs: int, level: int) -> list[bytes]:
    view = memoryview(buf)
    return [deflate(view[k : k + cs], level) for k in range(0, len(buf), cs)]


def workers_for(setting: int) -> int:
    """Threads that compress: the setting, or (0) the CPUs this process may use."""
    if setting > 0:
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Spool:
    """Payloads written once in order, read back by offset: memory or a 0600 file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.size = 0
        self._mem = bytearray()
        self._fd = -1
        self._closed = False
        self._lock = threading.Lock()  # the upload's reader thread may outlive a failed job
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale one (a dead job's) is garbage: the job lock is ours
            try:
                self._fd = os.open(
                    path,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as exc:
                raise LocalIOError(f"cannot create the compression spool {path}: {exc}") from exc

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self._mem += data
        else:
            view = memoryview(data)
            try:
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as exc:
                cls = (
                    StorageFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else LocalIOError
                )
                raise cls(f"cannot write the compression spool {self.path}: {exc}") from exc
        self.size += len(data)

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            if self._closed:
                raise LocalIOError("the compression spool was closed")
            if self._fd < 0:
                return bytes(self._mem[offset : offset + length])
            try:
                out = os.pread(self._fd, length, offset)
            except OSError as exc:
                raise LocalIOError(f"cannot read the compression spool {self.path}: {exc}") from exc
        if len(out) != length:
            raise LocalIOError(f"the compression spool {self.path} is shorter than written")
        return out

    def close(self) -> None:
        """Free the memory or close and remove the file (idempotent)."""
        with self._lock:
            self._closed = True
            self._mem = bytearray()
            fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


class Compressed:
    """A compressed qcow2 ready to send (same face as :class:`flatten.Flattened`)."""

    format = "qcow2"

    def __init__(self, layout: qcow2_stream.StreamLayout, spool: Spool, allocated: int) -> None:
        self.layout = layout
        self.spool = spool
        self.size = layout.file_size
        self.allocated = allocated

    def chunks(self, chain: flatten.ChainMap | None = None) -> Iterator[bytes | bytearray]:
        """Tables, packed compressed payloads, padding, plain clusters (``chain`` unused)."""
        lay = self.layout
        cs = lay.cluster_size
        yield from qcow2_stream.metadata(lay)
        stored = lay.stored or ()
        yield from self._ranges(stored, compressed=True)
        tail = lay.compressed_bytes % cs
        if tail:
            yield bytes(cs - tail)
        yield from self._ranges(stored, compressed=False)

    def _ranges(self, stored: tuple[int, ...], *, compressed: bool) -> Iterator[bytes]:
        cs = self.layout.cluster_size
        start = length = pos = 0
        for n in stored:
            if (n < cs) == compressed:
                if (length and start + length != pos) or length >= BATCH:
                    yield self.spool.read(start, length)
                    length = 0
                if not length:
                    start = pos
                length += n
            pos += n
        if length:
            yield self.spool.read(start, length)

    def close(self) -> None:
        self.spool.close()


def compress(
    chain: flatten.ChainMap,
    *,
    spool_path: Path,
    workers: int = 0,
    level: int = LEVEL,
    cluster_size: int = qcow2_stream.DEFAULT_CLUSTER_SIZE,
    memory_limit: int = SPOOL_IN_MEMORY,
) -> Compressed:
    """Deflate ``chain``'s data clusters into a spool and lay the qcow2 out around them.

    The spool is at ``spool_path`` unless the chain holds at most ``memory_limit``
    bytes of data; the caller must :meth:`Compressed.close` the result."""
    if not 0 <= level <= 9:
        raise UsageError(f"zlib level {level} is not in 0..9")
    runs = qcow2_stream.clusters_of([(e.start, e.length) for e in chain.extents], cluster_size)
    qcow2_stream.plan(chain.virtual_size, runs, cluster_size)  # refuse a bad geometry first
    data_bytes = sum(n for _, n in runs) * cluster_size
    spool = Spool(None if data_bytes <= memory_limit else spool_path)
    try:
        stored = _spool_clusters(chain, runs, cluster_size, spool, workers_for(workers), level)
        layout = qcow2_stream.plan(chain.virtual_size, runs, cluster_size, stored)
    except BaseException:
        spool.close()
        raise
    return Compressed(layout, spool, chain.allocated)


def _spool_clusters(
    chain: flatten.ChainMap,
    runs: tuple[qcow2_stream.Run, ...],
    cs: int,
    spool: Spool,
    workers: int,
    level: int,
) -> list[int]:
    """Read, deflate (``workers`` threads) and spool every data cluster; their lengths."""
    stored: list[int] = []
    per_batch = max(1, BATCH // cs)
    pending: collections.deque[Future[list[bytes]]] = collections.deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            for payload in pending.popleft().result():
                spool.write(payload)
                stored.append(len(payload))

    layers = flatten.Layers(chain)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deflate")
    try:
        i = 0
        for first, count in runs:
            c = first
            while c < first + count:
                n = min(per_batch, first + count - c)
                buf = bytearray(n * cs)
                i = layers.fill(memoryview(buf), c * cs, chain.extents, i)
                pending.append(pool.submit(_deflate_batch, buf, cs, level))
                drain(workers + 1)  # bounded memory: about a batch per thread in flight
                c += n
        drain(0)
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        layers.close()
    return stored
