"""``formats.info``: qemu-img info's view of a disk, computed without qemu-img."""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet.errors import ImageFormatError, MissingFileError
from cowfleet.formats import info
from cowfleet.formats.info import backing_chain, disk_info, full_backing_name, size_to_str
from cowfleet.formats.overlay import create_overlay

MiB = 1024**2
GiB = 1024**3


def _raw(path: Path, size: int, data: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.write(data)
        f.truncate(size)
    return path


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "0.977 KiB"),
        (12288, "12 KiB"),
        (200704, "196 KiB"),
        (1265664, "1.21 MiB"),
        (20 * GiB, "20 GiB"),
        (21474836480 + 512, "20 GiB"),
        (4 * 1024 * GiB, "4 TiB"),
    ],
)
def test_size_to_str_like_qemu(n: int, text: str) -> None:
    assert size_to_str(n) == text


@pytest.mark.parametrize(
    ("image", "backing", "full"),
    [
        ("sub/top.qcow2", "base.qcow2", "sub/base.qcow2"),
        ("sub/top.qcow2", "../base.raw", "sub/../base.raw"),
        ("top.qcow2", "base.raw", "base.raw"),
        ("/a/b/top", "/c/base", "/c/base"),
        ("/top", "base", "/base"),
    ],
)
def test_full_backing_name_like_qemu(image: str, backing: str, full: str) -> None:
    assert full_backing_name(image, backing) == full


def test_overlay_info_and_json(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", 10 * MiB)
    top = tmp_path / "disk"
    create_overlay(top, base, "raw", size=20 * GiB, cluster_size=4096)
    d = disk_info(top)
    assert d.filename == str(top)
    assert d.format == "qcow2"
    assert d.virtual_size == 20 * GiB
    assert d.cluster_size == 4096
    assert d.actual_size == top.stat().st_blocks * 512
    assert d.backing_filename == str(base) == d.full_backing_filename
    assert d.backing_filename_format == "raw"
    assert not d.dirty_flag
    j = d.to_qemu_json()
    assert j == {
        "filename": str(top),
        "format": "qcow2",
        "virtual-size": 20 * GiB,
        "actual-size": d.actual_size,
        "cluster-size": 4096,
        "backing-filename": str(base),
        "full-backing-filename": str(base),
        "backing-filename-format": "raw",
        "format-specific": {
            "type": "qcow2",
            "data": {
                "compat": "1.1",
                "compression-type": "zlib",
                "lazy-refcounts": False,
                "refcount-bits": 16,
                "corrupt": False,
                "extended-l2": False,
            },
        },
        "dirty-flag": False,
    }


def test_render_shape(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", 10 * MiB)
    top = tmp_path / "disk"
    create_overlay(top, base, "raw", size=20 * GiB, lazy_refcounts=True)
    text = disk_info(top).render()
    lines = text.splitlines()
    assert lines[0] == f"image: {top}"
    assert lines[1] == "file format: qcow2"
    assert lines[2] == "virtual size: 20 GiB (21474836480 bytes)"
    assert lines[3].startswith("disk size: ")
    assert lines[4] == "cluster_size: 65536"
    assert lines[5] == f"backing file: {base}"
    assert lines[6] == "backing file format: raw"
    assert lines[7] == "Format specific information:"
    assert "    lazy refcounts: true" in lines
    assert "    compat: 1.1" in lines


def test_raw_virtual_size_rounds_to_sector(tmp_path: Path) -> None:
    d = disk_info(_raw(tmp_path / "a", 1000, b"abc"))
    assert d.format == "raw" and d.virtual_size == 1024
    assert "cluster-size" not in d.to_qemu_json()
    assert "backing-filename" not in d.to_qemu_json()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="not found"):
        disk_info(tmp_path / "nope")


def test_chain_three_levels(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", 16 * MiB)
    mid = tmp_path / "mid"
    create_overlay(mid, base, "raw", size=32 * MiB, backing_virtual_size=16 * MiB)
    top = tmp_path / "top"
    create_overlay(top, mid, "qcow2", size=64 * MiB, backing_virtual_size=32 * MiB)
    chain = backing_chain(top)
    assert [c.filename for c in chain] == [str(top), str(mid), str(base)]
    assert [c.format for c in chain] == ["qcow2", "qcow2", "raw"]
    assert [c.virtual_size for c in chain] == [64 * MiB, 32 * MiB, 16 * MiB]
    assert chain[-1].backing_filename is None


def test_chain_never_probes_a_raw_layer(tmp_path: Path) -> None:
    """A guest that wrote a qcow2 header into its raw base must not redirect qemu or us."""
    evil_src = tmp_path / "evil.qcow2"
    create_overlay(evil_src, _raw(tmp_path / "etc", 1), "raw", backing_virtual_size=0)
    base = _raw(tmp_path / "base.raw", 8 * MiB, evil_src.read_bytes())
    top = tmp_path / "top"
    create_overlay(top, base, "raw", backing_virtual_size=8 * MiB)
    chain = backing_chain(top)
    assert len(chain) == 2
    assert chain[1].format == "raw"
    assert chain[1].virtual_size == 8 * MiB
    assert chain[1].backing_filename is None
    # Read on its own (format detected) the same file is a qcow2 with a backing file.
    assert disk_info(base).format == "qcow2"


def test_chain_format_mismatch(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", 8 * MiB)
    top = tmp_path / "top"
    create_overlay(top, base, "qcow2", backing_virtual_size=8 * MiB)
    with pytest.raises(ImageFormatError, match="not in qcow2 format"):
        backing_chain(top)


def test_chain_loop_refused(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", 8 * MiB)
    a, b = tmp_path / "a", tmp_path / "b"
    create_overlay(a, base, "raw", backing_virtual_size=8 * MiB)
    create_overlay(b, a, "qcow2", backing_virtual_size=8 * MiB)
    create_overlay(a, b, "qcow2", backing_virtual_size=8 * MiB)  # a -> b -> a
    with pytest.raises(ImageFormatError, match="loop"):
        backing_chain(a)


def test_chain_self_loop_refused(tmp_path: Path) -> None:
    a = tmp_path / "a"
    _raw(a, 1)
    create_overlay(tmp_path / "a2", a, "qcow2", backing_virtual_size=0)
    (tmp_path / "a2").replace(a)  # a now names itself as its backing file
    with pytest.raises(ImageFormatError, match="loop"):
        backing_chain(a)


def test_chain_missing_backing(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", 8 * MiB)
    top = tmp_path / "top"
    create_overlay(top, base, "raw", backing_virtual_size=8 * MiB)
    base.unlink()
    assert disk_info(top).backing_filename == str(base)  # the top alone is still readable
    with pytest.raises(MissingFileError, match=f"backing file {base} of {top} not found"):
        backing_chain(top)


def test_chain_unrecorded_backing_format_is_not_probed(tmp_path: Path) -> None:
    base = _raw(tmp_path / "base.raw", 8 * MiB)
    top = tmp_path / "top"
    create_overlay(top, base, "raw", backing_virtual_size=8 * MiB)
    data = bytearray(top.read_bytes())
    ext = data.index(bytes.fromhex("e2792aca"))
    data[ext : ext + 4] = bytes.fromhex("7fffffff")  # an unknown (ignorable) extension instead
    top.write_bytes(bytes(data))
    assert disk_info(top).backing_filename_format is None
    with pytest.raises(ImageFormatError, match="does not record"):
        backing_chain(top)


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ('json:{"file.filename":"/etc/shadow"}', True),
        ("nbd:localhost:10809", True),
        ("/var/lib/x:y", False),
        ("rel/dir:x", False),
        ("plain", False),
    ],
)
def test_protocol_names(name: str, protocol: bool) -> None:
    assert info._has_protocol(name) is protocol


def test_render_nested_format_specific() -> None:
    d = info.DiskInfo(
        filename="a.vmdk",
        format="vmdk",
        virtual_size=GiB,
        actual_size=12288,
        cluster_size=65536,
        format_specific={
            "type": "vmdk",
            "data": {
                "cid": 1,
                "create-type": "streamOptimized",
                "extents": [{"compressed": True, "filename": "a.vmdk", "format": ""}],
            },
        },
    )
    assert d.render().endswith(
        "Format specific information:\n"
        "    cid: 1\n"
        "    create type: streamOptimized\n"
        "    extents:\n"
        "        [0]:\n"
        "            compressed: true\n"
        "            filename: a.vmdk\n"
        "            format: \n"
    )
    j = d.to_qemu_json()
    j["format-specific"]["data"]["extents"][0]["format"] = "changed"
    assert d.format_specific is not None
    assert d.format_specific["data"]["extents"][0]["format"] == ""  # a copy, not a view
