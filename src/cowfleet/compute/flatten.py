"""Flatten a disk's backing chain (overlay + base) into one standalone image, as a stream.

1. ``qemu-img map --output=json`` (through :mod:`cowfleet.proc`, ``-U`` so a running
   guest's read-only layers can be read) says, for every guest range, whether it holds
   data, which layer of the chain has it, and at which host offset of that layer's file.
2. :func:`cowfleet.formats.qcow2_stream.plan` lays the output out from the clusters that
   hold data; its tables are sent first.
3. The data clusters are read straight from the layers' files with ``pread`` (a
   compressed cluster is inflated by :class:`~cowfleet.formats.qcow2_read.CompressedReader`)
   and sent in guest order.

Nothing is written to disk: memory use is one batch of clusters (4 MiB). The ``raw``
format sends the whole virtual size instead (zeros where nothing is allocated).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cowfleet import proc, qemuimg
from cowfleet.errors import CommandError, ImageFormatError, UsageError
from cowfleet.formats import qcow2_stream
from cowfleet.formats.qcow2_read import CompressedReader

FORMATS = ("qcow2", "raw")
MAP_TIMEOUT = 600.0
BATCH = 4 * 1024 * 1024


@dataclass(frozen=True)
class Extent:
    """A guest range that holds data: in layer ``depth`` at ``offset`` (None: compressed)."""

    start: int
    length: int
    depth: int
    offset: int | None


@dataclass(frozen=True)
class ChainMap:
    virtual_size: int
    files: tuple[tuple[str, str], ...]  # (path, format) of each layer, top first
    extents: tuple[Extent, ...]  # data extents only, sorted by start

    @property
    def allocated(self) -> int:
        """Bytes of guest data the chain holds (what a flattened image must carry)."""
        return sum(e.length for e in self.extents)


def parse_map(text: str) -> list[Extent]:
    """The data extents of ``qemu-img map --output=json`` (zero and absent ranges dropped)."""
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"qemu-img map printed something that is not JSON: {exc}") from exc
    if not isinstance(items, list):
        raise CommandError("qemu-img map did not print a list")
    out: list[Extent] = []
    for item in items:
        try:
            if not item.get("data") or item.get("zero") or not item.get("present", True):
                continue
            offset = item.get("offset")
            out.append(
                Extent(
                    int(item["start"]),
                    int(item["length"]),
                    int(item["depth"]),
                    None if offset is None else int(offset),
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CommandError(f"unexpected qemu-img map entry {item!r}") from exc
    out.sort(key=lambda e: e.start)
    return out


def chain_map(path: Path, fmt: str = "qcow2", *, runner: qemuimg.Runner = proc.run) -> ChainMap:
    """The allocation map of ``path``'s whole chain, and the files of its layers."""
    path = Path(path).absolute()
    layers = qemuimg.info_chain(path, fmt, runner=runner)
    argv = [qemuimg.PROGRAM, "map", "--output=json", "-U", "-f", fmt, str(path)]
    result = runner(argv, timeout=MAP_TIMEOUT, limits=qemuimg.CONVERT_LIMITS)
    # qemu names each lower layer as it opened it (joined to the overlay's folder)
    files = tuple((i.filename, i.format) for i in layers)
    return ChainMap(layers[0].virtual_size, files, tuple(parse_map(result.stdout)))


@dataclass(frozen=True)
class Flattened:
    """A flattened image ready to send: its size and its bytes, as an iterator."""

    format: str
    size: int
    allocated: int  # guest data bytes of the chain
    layout: qcow2_stream.StreamLayout | None

    def chunks(self, chain: ChainMap) -> Iterator[bytes | bytearray]:
        if self.format == "raw":
            return _raw_chunks(chain)
        assert self.layout is not None
        return _qcow2_chunks(chain, self.layout)


def plan(
    chain: ChainMap,
    fmt: str = "qcow2",
    cluster_size: int = qcow2_stream.DEFAULT_CLUSTER_SIZE,
) -> Flattened:
    if fmt not in FORMATS:
        raise UsageError(f"snapshot format {fmt!r}: use {' or '.join(FORMATS)}")
    if fmt == "raw":
        return Flattened("raw", chain.virtual_size, chain.allocated, None)
    runs = qcow2_stream.clusters_of([(e.start, e.length) for e in chain.extents], cluster_size)
    layout = qcow2_stream.plan(chain.virtual_size, runs, cluster_size)
    return Flattened("qcow2", layout.file_size, chain.allocated, layout)


class _Layers:
    """Open descriptors of the chain's files (read only), closed together."""

    def __init__(self, chain: ChainMap) -> None:
        self.chain = chain
        self.fds: dict[int, int] = {}
        self.readers: dict[int, CompressedReader] = {}

    def fd(self, depth: int) -> int:
        if depth not in self.fds:
            path = self.chain.files[depth][0]
            self.fds[depth] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return self.fds[depth]

    def compressed(self, depth: int) -> CompressedReader:
        if depth not in self.readers:
            if self.chain.files[depth][1] != "qcow2":
                raise ImageFormatError(f"layer {depth} has data without a host offset")
            self.readers[depth] = CompressedReader(self.fd(depth))
        return self.readers[depth]

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def fill(self, buf: memoryview, start: int, extents: tuple[Extent, ...], i: int) -> int:
        """Copy into ``buf`` (guest bytes from ``start``) every extent part it covers.

        ``i`` is the first extent that may overlap; returns the first one that may
        overlap the next buffer."""
        end = start + len(buf)
        n = len(extents)
        while i < n and extents[i].start + extents[i].length <= start:
            i += 1
        j = i
        while j < n and extents[j].start < end:
            e = extents[j]
            lo, hi = max(e.start, start), min(e.start + e.length, end)
            if e.offset is not None:
                _pread_into(self.fd(e.depth), buf[lo - start : hi - start], e.offset + lo - e.start)
            else:
                reader = self.compressed(e.depth)
                cs = reader.cluster_size
                pos = lo
                while pos < hi:
                    cluster_start = pos - pos % cs
                    data = reader.cluster(pos)
                    stop = min(hi, cluster_start + cs)
                    buf[pos - start : stop - start] = data[
                        pos - cluster_start : stop - cluster_start
                    ]
                    pos = stop
            j += 1
        return i


Layers = _Layers  # public name: compute.compress reads the chain the same way


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:  # past the end of a raw file: reads as zeros
            view[done:] = bytes(len(view) - done)
            return
        done += n


def _qcow2_chunks(
    chain: ChainMap, layout: qcow2_stream.StreamLayout
) -> Iterator[bytes | bytearray]:
    yield from qcow2_stream.metadata(layout)
    cs = layout.cluster_size
    per_batch = max(1, BATCH // cs)
    layers = _Layers(chain)
    try:
        i = 0
        for first, count in layout.runs:
            c = first
            while c < first + count:
                n = min(per_batch, first + count - c)
                buf = bytearray(n * cs)
                i = layers.fill(memoryview(buf), c * cs, chain.extents, i)
                yield buf
                c += n
    finally:
        layers.close()


def _raw_chunks(chain: ChainMap) -> Iterator[bytes | bytearray]:
    layers = _Layers(chain)
    try:
        i = 0
        pos = 0
        while pos < chain.virtual_size:
            n = min(BATCH, chain.virtual_size - pos)
            buf = bytearray(n)
            i = layers.fill(memoryview(buf), pos, chain.extents, i)
            yield buf
            pos += n
    finally:
        layers.close()


def write_to(path: Path, chain: ChainMap, flat: Flattened) -> int:
    """Write the flattened image to ``path`` (tests, benchmarks); the bytes written."""
    total = 0
    with open(path, "wb") as f:
        for chunk in flat.chunks(chain):
            f.write(chunk)
            total += len(chunk)
    return total
