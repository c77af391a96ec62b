"""Compressed snapshots: the qcow2 layout with compressed descriptors (sans-I/O), the
spool's life in a snapshot job (fake image client), and recovery of a left-over spool."""

from __future__ import annotations

import errno
import json
import os
import struct
import uuid as uuidlib
import zlib
from pathlib import Path
from typing import Any

import pytest

from cowfleet.compute import compress, flatten
from cowfleet.errors import LocalIOError, StorageFullError, ValidationError
from cowfleet.formats import qcow2_stream as qs
from cowfleet.formats.qcow2 import parse_header
from cowfleet.node import snapshots as snap

MiB = 1 << 20


def _guest(image: bytes) -> dict[int, bytes]:
    """Every allocated guest cluster of an in-memory qcow2 (plain or compressed)."""
    h = parse_header(image[:4096], file_size=len(image))
    cs = h.cluster_size
    bits = cs.bit_length() - 1
    x = 62 - (bits - 8)
    out: dict[int, bytes] = {}
    for i in range(h.l1_size):
        (l1,) = struct.unpack_from(">Q", image, h.l1_table_offset + 8 * i)
        l2_off = l1 & ((1 << 56) - 1) & ~(cs - 1)
        if not l2_off:
            continue
        for j in range(cs // 8):
            (e,) = struct.unpack_from(">Q", image, l2_off + 8 * j)
            c = i * (cs // 8) + j
            if e & qs.OFLAG_COMPRESSED:
                assert not e & qs.OFLAG_COPIED
                off = e & ((1 << x) - 1)
                extra = (e >> x) & ((1 << (bits - 8)) - 1)
                end = (off // 512 + extra + 1) * 512
                assert end <= len(image)
                data = zlib.decompressobj(-12).decompress(image[off:end], cs)
                assert len(data) == cs
                out[c] = data
            elif e:
                assert e & qs.OFLAG_COPIED
                off = e & ((1 << 56) - 1) & ~(cs - 1)
                out[c] = image[off : off + cs]
    return out


def _refcounts(image: bytes, lay: qs.StreamLayout) -> tuple[int, ...]:
    rb = image[lay.refcount_block_offset : lay.l1_table_offset]
    return struct.unpack(f">{len(rb) // 2}H", rb)


def _clusters(cs: int) -> list[bytes]:
    text = b"".join(b"row %06d compresses\n" % i for i in range(cs // 8))[:cs]
    return [
        text,
        os.urandom(cs),  # stays plain
        bytes([7]) * cs,
        text[::-1],
        os.urandom(cs),
        b"\x00" * (cs - 3) + b"end",
    ]


@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
def test_layout_with_compressed_descriptors_round_trips(cs: int) -> None:
    data = _clusters(cs)
    payloads = [compress.deflate(d) for d in data]
    assert [len(p) == cs for p in payloads] == [False, True, False, False, True, False]
    runs = ((0, 3), (cs // 8 + 5, 3))  # two L2 tables
    lay = qs.plan((cs // 8 + 100) * cs, runs, cs, [len(p) for p in payloads])
    assert lay.plain_clusters == 2 and lay.compressed_bytes == sum(
        len(p) for p in payloads if len(p) < cs
    )
    assert lay.plain_offset % cs == 0 and lay.plain_offset >= lay.data_offset
    packed = b"".join(p for p in payloads if len(p) < cs)
    plain = b"".join(p for p in payloads if len(p) == cs)
    image = b"".join(qs.metadata(lay)) + packed
    image += bytes(-len(image) % cs) + plain
    assert len(image) == lay.file_size == lay.total_clusters * cs
    guest = [0, 1, 2, cs // 8 + 5, cs // 8 + 6, cs // 8 + 7]
    assert _guest(image) == dict(zip(guest, data, strict=True))
    counts = _refcounts(image, lay)
    assert counts[: lay.data_offset // cs] == (1,) * (lay.data_offset // cs)
    first = lay.data_offset // cs
    assert counts[first : first + lay.compressed_clusters] == lay.compressed_refcounts
    assert all(counts[lay.plain_offset // cs + k] == 1 for k in range(2))
    assert not any(counts[lay.total_clusters :])


def test_payloads_sharing_a_sector_or_crossing_a_cluster_count_for_each_cluster() -> None:
    cs = 4096
    lay = qs.plan(64 * cs, ((0, 3),), cs, [300, 4000, 2000])
    # 0..299 (sector 0), 300..4299 (sectors 0..8: clusters 0 and 1), 4300..6299 (cluster 1)
    assert lay.compressed_refcounts == (2, 2)
    assert lay.compressed_clusters == 2 and lay.plain_clusters == 0
    e = qs.compressed_entry(lay.data_offset + 300, 4000, cs)
    x = 62 - (12 - 8)
    assert e >> 62 == 1 and e & ((1 << x) - 1) == lay.data_offset + 300
    assert (e >> x) & 0xF == 8  # sectors 0..8 of the area: 8 after the first


def test_all_plain_stored_is_the_plain_layout() -> None:
    runs = ((0, 2), (10, 1))
    a = qs.plan(MiB, runs, 65536)
    b = qs.plan(MiB, runs, 65536, [65536] * 3)
    assert b"".join(qs.metadata(a)) == b"".join(qs.metadata(b))
    assert a.file_size == b.file_size


@pytest.mark.parametrize("stored", [[100], [100, 200, 300], [0, 1], [1, 65537]])
def test_plan_refuses_bad_stored_lengths(stored: list[int]) -> None:
    with pytest.raises(ValidationError):
        qs.plan(MiB, ((0, 2),), 65536, stored)


def test_deflate_keeps_what_does_not_shrink() -> None:
    noise = os.urandom(65536)
    assert compress.deflate(noise) == noise
    small = compress.deflate(b"a" * 65536)
    assert len(small) < 1000
    assert zlib.decompressobj(-12).decompress(small) == b"a" * 65536


# -- the snapshot job ------------------------------------------------------------------


class SpoolWatchingImages:
    def __init__(self, spool: Path, fail: Exception | None = None) -> None:
        self.spool = spool
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []
        self.received = b""
        self.spool_mode: int | None = None

    def update(self, image_id: str, changes: Any) -> None:
        self.calls.append(("update", dict(changes)))

    def upload(self, image_id: str, data: Any, *, size: int | None = None) -> None:
        self.spool_mode = self.spool.stat().st_mode & 0o777
        for chunk in data:
            self.received += bytes(chunk)
            if self.fail is not None:
                raise self.fail
        self.calls.append(("upload", size))

    def delete(self, image_id: str) -> None:
        self.calls.append(("delete", image_id))

    def close(self) -> None:
        pass


def _instance(tmp_path: Path) -> tuple[Path, str, bytes]:
    uuid = str(uuidlib.uuid4())
    folder = tmp_path / uuid
    folder.mkdir()
    disk = b"text compresses well\n" * 30000
    disk = disk[: MiB // 2] + os.urandom(MiB // 2)
    (folder / "disk").write_bytes(disk)
    return folder, uuid, disk


def _chain(path: Path) -> flatten.ChainMap:
    return flatten.ChainMap(4 * MiB, ((str(path), "raw"),), (flatten.Extent(0, MiB, 0, 0),))


@pytest.mark.parametrize("fail", [None, StorageFullError("no space left (HTTP 507)")])
def test_a_compressed_snapshot_spools_beside_the_disk_and_removes_it(
    tmp_path: Path, fail: Exception | None
) -> None:
    folder, uuid, disk = _instance(tmp_path)
    images = SpoolWatchingImages(folder / snap.SPOOL, fail)
    s = snap.Snapshots(
        tmp_path,
        object(),
        lambda token: images,
        chain_map=_chain,
        compression="zlib",
        compress_workers=2,
        spool_memory=0,
    )
    s.start(uuid, str(uuidlib.uuid4()), "tok")
    view = s.wait(uuid, 60)
    assert images.spool_mode == 0o600  # the spool existed during the upload
    assert not (folder / snap.SPOOL).exists() and not (folder / snap.MARKER).exists()
    assert view.compression == "zlib"
    if fail is not None:
        assert view.state == "failed" and ("delete", view.image_id) in images.calls
        return
    assert view.state == "done" and ("upload", view.bytes_sent) in images.calls
    assert images.calls[0] == ("update", {"disk_format": "qcow2", "container_format": "bare"})
    guest = _guest(images.received)
    assert b"".join(guest[c] for c in range(16)) == disk
    plain = flatten.plan(_chain(folder / "disk"))
    assert view.bytes_sent <= plain.size - 7 * 65536  # the text's 8 clusters packed in 1


def test_compression_needs_qcow2_and_a_known_name(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs snapshot format qcow2"):
        snap.Snapshots(tmp_path, object(), lambda t: None, fmt="raw", compression="zlib")
    with pytest.raises(ValidationError, match="use none or zlib"):
        snap.Snapshots(tmp_path, object(), lambda t: None, compression="zstd")


def test_recover_removes_a_left_over_spool(tmp_path: Path) -> None:
    folder, uuid, _ = _instance(tmp_path)
    images = SpoolWatchingImages(folder / snap.SPOOL)
    (folder / snap.MARKER).write_text(json.dumps({"image_id": "img-1", "token": "t"}))
    (folder / snap.SPOOL).write_bytes(b"half a spool")
    s = snap.Snapshots(tmp_path, object(), lambda token: images)
    assert s.recover() == [uuid]
    assert not (folder / snap.SPOOL).exists() and not (folder / snap.MARKER).exists()
    assert ("delete", "img-1") in images.calls and (folder / "disk").exists()


@pytest.mark.parametrize("on_disk", [True, False])
def test_spool_reads_back_and_refuses_reads_once_closed(tmp_path: Path, on_disk: bool) -> None:
    path = tmp_path / "disk.spool"
    path.write_bytes(b"stale")  # a dead job's: replaced
    spool = compress.Spool(path if on_disk else None)
    spool.write(b"abc")
    spool.write(b"defgh")
    assert spool.read(2, 4) == b"cdef" and spool.size == 8
    if on_disk:
        assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_size == 8
    spool.close()
    spool.close()
    assert path.exists() != on_disk
    with pytest.raises(LocalIOError, match="closed"):
        spool.read(0, 1)


def test_workers_default_to_the_cpus() -> None:
    assert compress.workers_for(3) == 3
    assert compress.workers_for(0) == len(os.sched_getaffinity(0))


def test_a_full_disk_while_spooling_is_storage_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = compress.Spool(tmp_path / "disk.spool")

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compress.os, "write", full)
    with pytest.raises(StorageFullError, match="compression spool"):
        spool.write(b"x" * 100)
    spool.close()
    assert not (tmp_path / "disk.spool").exists()
