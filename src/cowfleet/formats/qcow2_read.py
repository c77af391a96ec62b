"""Read one compressed guest cluster of a qcow2 file (qcow2.txt, "Compressed Clusters").

``qemu-img map`` gives the host offset of every plain data cluster, which is then
read straight from the file; a compressed cluster has no such offset, so its L2
entry is looked up here and the deflate stream inflated. zlib only (the
compression type of nearly every image); a zstd image is refused.
"""

from __future__ import annotations

import os
import struct
import zlib

from cowfleet.errors import ImageFormatError
from cowfleet.formats.qcow2 import parse_header

_L1_MASK = 0x00FFFFFFFFFFFE00
_COMPRESSED = 1 << 62


class CompressedReader:
    """Reads guest clusters of the qcow2 open at ``fd`` (its own layer only)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        head = os.pread(fd, 4096, 0)
        h = parse_header(head, file_size=os.fstat(fd).st_size)
        if h.compression_type != "zlib":
            raise ImageFormatError("only zlib-compressed qcow2 clusters can be read")
        if h.incompatible_features & h.INCOMPAT_EXTL2:
            raise ImageFormatError("compressed clusters with extended L2 entries are not read")
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.l1_offset = h.l1_table_offset
        self.l1_size = h.l1_size
        self._l2_cache: dict[int, bytes] = {}

    def _l2(self, offset: int) -> bytes:
        table = self._l2_cache.get(offset)
        if table is None:
            table = os.pread(self.fd, self.cluster_size, offset)
            if len(self._l2_cache) > 64:
                self._l2_cache.clear()
            self._l2_cache[offset] = table
        return table

    def cluster(self, guest_offset: int) -> bytes:
        """The guest-visible bytes of the compressed cluster holding ``guest_offset``."""
        cs = self.cluster_size
        index = guest_offset // cs
        per_l2 = cs // 8
        l1_index, l2_index = divmod(index, per_l2)
        if l1_index >= self.l1_size:
            raise ImageFormatError(f"guest offset {guest_offset} past the L1 table")
        (l1e,) = struct.unpack(">Q", os.pread(self.fd, 8, self.l1_offset + l1_index * 8))
        l2_offset = l1e & _L1_MASK
        if not l2_offset:
            raise ImageFormatError(f"guest offset {guest_offset} is not allocated")
        (e,) = struct.unpack_from(">Q", self._l2(l2_offset), l2_index * 8)
        if not e & _COMPRESSED:
            raise ImageFormatError(f"guest offset {guest_offset} is not a compressed cluster")
        x = 62 - (self.cluster_bits - 8)
        host = e & ((1 << x) - 1)
        sectors = ((e >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        length = sectors * 512 - (host & 511)
        raw = os.pread(self.fd, length, host)
        d = zlib.decompressobj(-12)
        out = d.decompress(raw, cs)
        if len(out) != cs:
            raise ImageFormatError(f"compressed cluster at {host} inflates to {len(out)} bytes")
        return out
