"""``compute.flatten`` + ``formats.qcow2_stream``: a chain flattened into a stream, judged
by the real qemu-img (check: no errors, no leaks; compare: same guest content)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet import proc, qemuimg
from cowfleet.compute import flatten
from cowfleet.formats.inspector import inspect_path
from tests.conftest import qemu_io, require_program

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _qemu() -> None:
    require_program("qemu-img")
    require_program("qemu-io")


def _chain(tmp_path: Path, base_fmt: str, size: int = 700 * MiB) -> Path:
    """A base with data in several places and an overlay that changes some of it."""
    hi = size * 6 // 7 // MiB * MiB  # lies in another L2 table than 0 (64 KiB clusters)
    mid = size // 2 // MiB * MiB
    base = tmp_path / f"base.{base_fmt}"
    qemuimg.create(base, base_fmt, size)
    qemu_io(
        base, base_fmt, "write -P 0x11 0 192k", "write -P 0x22 5000 3000", f"write -P 0x33 {hi} 1M"
    )
    if base_fmt == "qcow2":  # compressed clusters too: the reader must inflate them
        packed = tmp_path / "packed.qcow2"
        proc.run(
            ["qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", str(base), str(packed)]
        )
        base = packed
    top = tmp_path / "disk"
    qemuimg.create(top, "qcow2", None, backing=base, backing_fmt=base_fmt)
    qemu_io(
        top,
        "qcow2",
        "write -P 0xab 64k 4k",
        f"write -P 0xcd {mid} 2M",
        f"write -z {hi} 64k",
        f"write -P 0xef {size - 4096} 4096",
    )
    return top


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cluster_size", [65536, 512])
def test_flattened_qcow2_is_clean_and_equal(
    tmp_path: Path, base_fmt: str, cluster_size: int
) -> None:
    top = _chain(tmp_path, base_fmt)
    chain = flatten.chain_map(top)
    flat = flatten.plan(chain, "qcow2", cluster_size)
    out = tmp_path / "flat.qcow2"
    assert flatten.write_to(out, chain, flat) == flat.size == out.stat().st_size
    result = qemuimg.check(out, "qcow2")
    assert result.clean, result.raw
    proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(top), str(out)])
    info = qemuimg.info(out, "qcow2")
    assert info.backing_filename is None and info.virtual_size == chain.virtual_size
    # only what the chain holds (rounded to clusters), plus its tables
    assert flat.size <= chain.allocated * 1.1 + flat.layout.metadata_size + 16 * 65536
    assert inspect_path(out).format == "qcow2"


def test_flattened_raw_is_equal(tmp_path: Path) -> None:
    top = _chain(tmp_path, "raw", size=64 * MiB + 4096)
    chain = flatten.chain_map(top)
    flat = flatten.plan(chain, "raw")
    out = tmp_path / "flat.raw"
    assert flatten.write_to(out, chain, flat) == chain.virtual_size
    proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(out)])


def test_empty_overlay_on_empty_base(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemuimg.create(base, "raw", 8 * MiB)
    top = tmp_path / "disk"
    qemuimg.create(top, "qcow2", None, backing=base, backing_fmt="raw")
    chain = flatten.chain_map(top)
    out = tmp_path / "flat.qcow2"
    flatten.write_to(out, chain, flatten.plan(chain))
    assert qemuimg.check(out, "qcow2").clean
    proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(top), str(out)])
