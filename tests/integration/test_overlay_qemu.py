"""Overlays written by cowfleet, judged by the real qemu-img and qemu-io."""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet import proc, qemuimg
from cowfleet.errors import CommandError, UnsafeImageError, ValidationError
from cowfleet.formats.overlay import create_overlay
from tests.conftest import require_program

GiB = 1024**3
CLUSTER_SIZES = [512 << i for i in range(13)]  # 512 B .. 2 MiB


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    require_program("qemu-img")


@pytest.fixture
def raw_base(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    with base.open("wb") as f:
        f.truncate(1 * GiB)
        f.seek(0)
        f.write(b"B" * 65536)  # recognisable first 64 KiB
    return base


def _assert_clean(path: Path) -> qemuimg.CheckResult:
    result = qemuimg.check(path, "qcow2")
    assert result.returncode == 0, result.raw
    assert result.check_errors == 0 and result.corruptions == 0 and result.leaks == 0
    assert result.clean
    return result


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@pytest.mark.parametrize(
    "size",
    [1 * GiB, 20 * GiB + 12345, 200 * GiB + 512 * 3],
    ids=["1G", "20G-odd", "200G+"],
)
def test_every_cluster_size_passes_qemu_img_check(
    tmp_path: Path, raw_base: Path, cluster_size: int, size: int
) -> None:
    out = tmp_path / "disk"
    if cluster_size == 512 and size > 100 * GiB:
        # qemu-img refuses this too: the L1 table would exceed 32 MiB.
        with pytest.raises(ValidationError, match="too large"):
            create_overlay(
                out, raw_base, "raw", size=size, cluster_size=cluster_size, backing_virtual_size=GiB
            )
        assert not out.exists()
        return
    res = create_overlay(
        out, raw_base, "raw", size=size, cluster_size=cluster_size, backing_virtual_size=GiB
    )
    assert res.virtual_size == -(-size // 512) * 512
    _assert_clean(out)
    info = qemuimg.info(out, "qcow2")
    assert info.virtual_size == res.virtual_size
    assert info.cluster_size == cluster_size
    assert info.backing_filename == str(raw_base)
    assert info.backing_filename_format == "raw"
    assert info.format_specific is not None
    assert info.format_specific["data"]["compat"] == "1.1"
    assert info.format_specific["data"]["lazy-refcounts"] is False


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * 1024 * 1024])
def test_lazy_refcounts(tmp_path: Path, raw_base: Path, cluster_size: int) -> None:
    out = tmp_path / "disk"
    create_overlay(
        out,
        raw_base,
        "raw",
        size=4 * GiB,
        cluster_size=cluster_size,
        lazy_refcounts=True,
        backing_virtual_size=GiB,
    )
    _assert_clean(out)
    info = qemuimg.info(out, "qcow2")
    assert info.format_specific is not None
    assert info.format_specific["data"]["lazy-refcounts"] is True


def test_empty_backing_gives_zero_size_overlay(tmp_path: Path) -> None:
    base = tmp_path / "empty.raw"
    base.write_bytes(b"")
    out = tmp_path / "disk"
    res = create_overlay(out, base, "raw", backing_virtual_size=0)
    assert res.virtual_size == 0
    _assert_clean(out)


def test_overlay_on_qcow2_backing(tmp_path: Path, raw_base: Path) -> None:
    mid = tmp_path / "mid.qcow2"
    qemuimg.create(mid, "qcow2", 2 * GiB)
    top = tmp_path / "top.qcow2"
    create_overlay(top, mid, "qcow2", size=3 * GiB, backing_virtual_size=2 * GiB)
    _assert_clean(top)
    chain = qemuimg.info_chain(top, "qcow2")
    assert [c.format for c in chain] == ["qcow2", "qcow2"]
    assert chain[0].backing_filename_format == "qcow2"
    assert chain[1].virtual_size == 2 * GiB


def test_writes_land_in_overlay_and_reads_fall_through(tmp_path: Path, raw_base: Path) -> None:
    qemu_io = require_program("qemu-io")
    out = tmp_path / "disk"
    create_overlay(out, raw_base, "raw", size=2 * GiB, backing_virtual_size=GiB)
    before = out.stat().st_size
    proc.run([qemu_io, "-f", "qcow2", "-c", "write -P 0x41 1M 128k", str(out)])
    proc.run([qemu_io, "-f", "qcow2", "-c", "write -P 0x43 1536M 64k", str(out)])
    assert out.stat().st_size > before
    # Written ranges come from the overlay ...
    proc.run([qemu_io, "-f", "qcow2", "-c", "read -P 0x41 1M 128k", str(out)])
    proc.run([qemu_io, "-f", "qcow2", "-c", "read -P 0x43 1536M 64k", str(out)])
    # ... the rest falls through to the backing file ("B") or reads as zero past it.
    proc.run([qemu_io, "-f", "qcow2", "-c", "read -P 0x42 0 64k", str(out)])
    proc.run([qemu_io, "-f", "qcow2", "-c", "read -P 0 512M 64k", str(out)])
    # qemu-io's pattern check really compares: the wrong pattern fails.
    with pytest.raises(CommandError):
        proc.run([qemu_io, "-f", "qcow2", "-c", "read -P 0x41 0 64k", str(out)])
    # The backing file itself was not written.
    assert raw_base.read_bytes()[1024 * 1024 : 1024 * 1024 + 16] == b"\0" * 16
    _assert_clean(out)


def test_existing_file_is_replaced_atomically(tmp_path: Path, raw_base: Path) -> None:
    out = tmp_path / "disk"
    out.write_bytes(b"old")
    create_overlay(out, raw_base, "raw", backing_virtual_size=GiB)
    _assert_clean(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_backing_is_inspected_and_default_size_is_its_virtual_size(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemuimg.create(base, "qcow2", 3 * GiB + 4096)
    out = tmp_path / "disk"
    res = create_overlay(out, base, "qcow2")
    assert res.virtual_size == 3 * GiB + 4096
    _assert_clean(out)
    assert [c.virtual_size for c in qemuimg.info_chain(out, "qcow2")] == [res.virtual_size] * 2


@pytest.mark.parametrize(
    "make",
    ["backing-file", "data-file", "format-mismatch"],
)
def test_hostile_backing_made_by_qemu_is_refused(tmp_path: Path, raw_base: Path, make: str) -> None:
    bad = tmp_path / "bad.qcow2"
    fmt = "qcow2"
    if make == "backing-file":
        qemuimg.create(bad, "qcow2", GiB, backing=raw_base, backing_fmt="raw")
    elif make == "data-file":
        qemuimg.create(bad, "qcow2", GiB, options={"data_file": str(tmp_path / "data.raw")})
    else:
        qemuimg.create(bad, "qcow2", GiB)
        fmt = "raw"  # a qcow2 file declared as raw
    out = tmp_path / "disk"
    with pytest.raises(UnsafeImageError) as err:
        create_overlay(out, bad, fmt, size=2 * GiB)
    assert err.value.failures
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("fmt", "opts"),
    [
        ("raw", {}),
        ("qcow2", {}),
        ("vmdk", {}),
        ("vmdk", {"subformat": "streamOptimized"}),
        ("vpc", {}),
        ("vhdx", {}),
        ("vdi", {}),
    ],
    ids=["raw", "qcow2", "vmdk", "vmdk-stream", "vpc", "vhdx", "vdi"],
)
def test_overlay_on_every_backing_format(tmp_path: Path, fmt: str, opts: dict[str, str]) -> None:
    qemu_io = require_program("qemu-io")
    base = tmp_path / f"base.{fmt}"
    qemuimg.create(base, fmt, 64 * 1024 * 1024, options=opts or None)
    if opts.get("subformat") != "streamOptimized":  # stream-optimized files are append-only
        proc.run([qemu_io, "-f", fmt, "-c", "write -P 0x61 0 64k", str(base)])
    out = tmp_path / "disk"
    res = create_overlay(out, base, fmt)  # inspected + policy-checked, default size
    chain = qemuimg.info_chain(out, "qcow2")
    assert res.virtual_size == chain[1].virtual_size
    assert chain[0].backing_filename_format == fmt
    _assert_clean(out)
    pattern = "0" if opts.get("subformat") == "streamOptimized" else "0x61"
    proc.run([qemu_io, "-f", "qcow2", "-c", f"read -P {pattern} 0 64k", str(out)])
