"""``compute.compress``: a chain flattened into a compressed qcow2 through a spool, judged
by the real qemu-img (check clean, compare equal, info, smaller than plain)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowfleet import proc, qemuimg
from cowfleet.compute import compress, flatten
from cowfleet.formats.inspector import inspect_path
from tests.conftest import qemu_io, require_program

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _qemu() -> None:
    require_program("qemu-img")
    require_program("qemu-io")


def _chain(tmp_path: Path, size: int = 300 * MiB) -> Path:
    """Compressible text, incompressible noise and patterns, over two L2 tables at 64 KiB."""
    base = tmp_path / "base.raw"
    qemuimg.create(base, "raw", size)
    text = b"".join(b"line %08d of a log file that compresses well\n" % i for i in range(60000))
    with open(base, "r+b") as f:
        f.write(text[: 3 * MiB])
        f.seek(9 * MiB + 1000)  # unaligned: clusters half noise, half zeros
        f.write(os.urandom(700 * 1024))
    qemu_io(base, "raw", "write -P 0x33 290M 1M")
    top = tmp_path / "disk"
    qemuimg.create(top, "qcow2", None, backing=base, backing_fmt="raw")
    qemu_io(top, "qcow2", "write -P 0xab 64k 4k", "write -P 0xcd 150M 2M", "write -z 290M 64k")
    with open(tmp_path / "noise", "wb") as f:
        f.write(os.urandom(2 * MiB))
    qemu_io(top, "qcow2", f"write -s {tmp_path / 'noise'} 200M 2M")  # plain clusters
    return top


def _write(out: Path, flat: compress.Compressed) -> int:
    total = 0
    with open(out, "wb") as f:
        for chunk in flat.chunks():
            f.write(chunk)
            total += len(chunk)
    return total


@pytest.mark.parametrize(
    ("cluster_size", "memory_limit", "workers"),
    [(65536, 0, 2), (65536, 1 << 40, 1), (512, 0, 3), (2 * MiB, 0, 2)],
)
def test_compressed_qcow2_is_clean_equal_and_smaller(
    tmp_path: Path, cluster_size: int, memory_limit: int, workers: int
) -> None:
    top = _chain(tmp_path)
    chain = flatten.chain_map(top)
    spool = tmp_path / "disk.spool"
    flat = compress.compress(
        chain,
        spool_path=spool,
        workers=workers,
        cluster_size=cluster_size,
        memory_limit=memory_limit,
    )
    try:
        assert spool.exists() == (memory_limit == 0)
        if spool.exists():
            assert spool.stat().st_mode & 0o777 == 0o600
        out = tmp_path / "flat.qcow2"
        assert _write(out, flat) == flat.size == out.stat().st_size
    finally:
        flat.close()
    assert not spool.exists()
    lay = flat.layout
    assert lay.stored is not None
    assert 0 < lay.plain_clusters < lay.data_clusters  # the noise stays plain
    result = qemuimg.check(out, "qcow2")
    assert result.clean, result.raw
    proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(top), str(out)])
    info = qemuimg.info(out, "qcow2")
    assert info.backing_filename is None and info.virtual_size == chain.virtual_size
    assert info.cluster_size == cluster_size
    assert result.compressed_clusters == lay.data_clusters - lay.plain_clusters > 0
    assert result.leaks == 0 and result.corruptions == 0
    plain = flatten.plan(chain, "qcow2", cluster_size)
    assert flat.size < plain.size
    assert flat.size - lay.data_offset < (plain.size - plain.layout.data_offset) * 0.6
    assert inspect_path(out).format == "qcow2"


def test_spool_is_removed_when_compression_fails(tmp_path: Path) -> None:
    top = _chain(tmp_path)
    chain = flatten.chain_map(top)
    gone = flatten.ChainMap(
        chain.virtual_size,
        ((str(tmp_path / "missing"), "qcow2"), *chain.files[1:]),
        chain.extents,
    )
    spool = tmp_path / "disk.spool"
    with pytest.raises(OSError):
        compress.compress(gone, spool_path=spool, memory_limit=0)
    assert not spool.exists()


def test_empty_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemuimg.create(base, "raw", 8 * MiB)
    top = tmp_path / "disk"
    qemuimg.create(top, "qcow2", None, backing=base, backing_fmt="raw")
    chain = flatten.chain_map(top)
    flat = compress.compress(chain, spool_path=tmp_path / "disk.spool", memory_limit=0)
    out = tmp_path / "flat.qcow2"
    try:
        _write(out, flat)
    finally:
        flat.close()
    assert qemuimg.check(out, "qcow2").clean
    proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(top), str(out)])
