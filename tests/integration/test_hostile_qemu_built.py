"""Images built by the real qemu-img: hostile ones are refused, valid ones pass.

Every valid image must be judged safe when declared as its own format, and the
inspector's virtual size must equal ``qemu-img info``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cowfleet import proc
from cowfleet.errors import CommandError
from cowfleet.formats.inspection import GLANCE_DISK_FORMATS
from cowfleet.formats.inspector import Inspector, inspect_path
from cowfleet.formats.policy import check
from tests.conftest import require_program

MiB = 1 << 20
SECRET = ["--object", "secret,id=sec0,data=hunter2"]


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    require_program("qemu-img")


def qemu_img(*args: str | Path) -> str:
    return proc.run(["qemu-img", *(str(a) for a in args)], timeout=60).stdout


def create(path: Path, fmt: str, size: str, *options: str) -> Path:
    if any("secret" in o for o in options):
        # LUKS key derivation times itself; on a loaded machine qemu-img sometimes fails
        # with "Unable to get accurate CPU usage". Retry a few times.
        for _ in range(4):
            try:
                qemu_img("create", "-q", "-f", fmt, *options, path, size)
                return path
            except CommandError as exc:
                if "accurate CPU usage" not in exc.stderr:
                    raise
    qemu_img("create", "-q", "-f", fmt, *options, path, size)
    return path


def qemu_info(path: Path, qemu_fmt: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(qemu_img("info", "--output=json", "-f", qemu_fmt, path))
    return info


def qemu_virtual_size(path: Path, qemu_fmt: str) -> int:
    return int(str(qemu_info(path, qemu_fmt)["virtual-size"]))


@pytest.fixture
def data_raw(tmp_path: Path) -> Path:
    """A 4 MiB raw disk with non-zero data spread over it (so converted images hold data)."""
    p = tmp_path / "data.raw"
    with p.open("wb") as f:
        for i in range(4):
            f.seek(i * MiB + 4096 * i)
            f.write(bytes([i + 1]) * 8192)
        f.truncate(4 * MiB)
    return p


# ----------------------------------------------------------------------------- hostile

Builder = Callable[[Path], Path]


def _backing(tmp: Path) -> Path:
    base = create(tmp / "base.raw", "raw", "8M")
    return create(tmp / "img", "qcow2", "16M", "-F", "raw", "-b", str(base))


def _backing_qcow2(tmp: Path) -> Path:
    base = create(tmp / "base.qcow2", "qcow2", "8M")
    return create(tmp / "img", "qcow2", "16M", "-F", "qcow2", "-b", str(base))


def _data_file(tmp: Path) -> Path:
    return create(tmp / "img", "qcow2", "16M", "-o", f"data_file={tmp / 'data.bin'}")


def _data_file_raw(tmp: Path) -> Path:
    return create(
        tmp / "img", "qcow2", "16M", "-o", f"data_file={tmp / 'data.bin'},data_file_raw=on"
    )


def _qcow2_luks(tmp: Path) -> Path:
    return create(
        tmp / "img",
        "qcow2",
        "16M",
        *SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50",
    )


def _raw_luks(tmp: Path) -> Path:
    return create(tmp / "img", "luks", "16M", *SECRET, "-o", "key-secret=sec0,iter-time=50")


def _vmdk(subformat: str) -> Builder:
    def build(tmp: Path) -> Path:
        return create(tmp / "img.vmdk", "vmdk", "16M", "-o", f"subformat={subformat}")

    return build


def _qed(tmp: Path) -> Path:
    return create(tmp / "img", "qed", "16M")


def _qcow1(tmp: Path) -> Path:
    return create(tmp / "img", "qcow", "16M")


def _qcow2_as_raw(tmp: Path) -> Path:
    return create(tmp / "img", "qcow2", "16M")


def _raw_as_vhd(tmp: Path) -> Path:
    return create(tmp / "img", "raw", "16M")


HOSTILE: list[tuple[str, Builder, str, set[str]]] = [
    ("qcow2-backing-raw", _backing, "qcow2", {"backing-file"}),
    ("qcow2-backing-qcow2", _backing_qcow2, "qcow2", {"backing-file"}),
    ("qcow2-backing-declared-raw", _backing, "raw", {"backing-file", "format-mismatch"}),
    ("qcow2-data-file", _data_file, "qcow2", {"data-file"}),
    ("qcow2-data-file-raw", _data_file_raw, "qcow2", {"data-file"}),
    ("qcow2-data-file-declared-raw", _data_file, "raw", {"data-file", "format-mismatch"}),
    ("qcow2-luks", _qcow2_luks, "qcow2", {"encrypted"}),
    ("raw-luks", _raw_luks, "raw", {"encrypted", "format-mismatch"}),
    (
        "vmdk-monolithicFlat",
        _vmdk("monolithicFlat"),
        "vmdk",
        {"vmdk-create-type", "vmdk-extent", "vmdk-descriptor-file"},
    ),
    (
        "vmdk-twoGbMaxExtentSparse",
        _vmdk("twoGbMaxExtentSparse"),
        "vmdk",
        {"vmdk-create-type", "vmdk-extent", "vmdk-descriptor-file"},
    ),
    (
        "vmdk-twoGbMaxExtentFlat",
        _vmdk("twoGbMaxExtentFlat"),
        "vmdk",
        {"vmdk-create-type", "vmdk-extent", "vmdk-descriptor-file"},
    ),
    ("qed", _qed, "raw", {"unsupported-format", "format-mismatch"}),
    ("qcow-v1", _qcow1, "qcow2", {"unsupported-format", "format-mismatch"}),
    ("qcow2-declared-raw", _qcow2_as_raw, "raw", {"format-mismatch"}),
    ("raw-declared-vhd", _raw_as_vhd, "vhd", {"format-mismatch"}),
]


@pytest.mark.parametrize(
    ("build", "declared", "codes"),
    [h[1:] for h in HOSTILE],
    ids=[h[0] for h in HOSTILE],
)
def test_qemu_built_hostile_images_are_refused(
    tmp_path: Path, build: Builder, declared: str, codes: set[str]
) -> None:
    path = build(tmp_path)
    verdict = check(declared, inspect_path(path))
    assert {f.code for f in verdict.failures} == codes, verdict.failures


def test_qemu_built_data_file_name_is_reported(tmp_path: Path) -> None:
    insp = inspect_path(_data_file(tmp_path))
    assert insp.qcow2 is not None and insp.qcow2.data_file == str(tmp_path / "data.bin")
    assert insp.qcow2.has_data_file_bit


def test_qemu_built_backing_name_and_format(tmp_path: Path) -> None:
    insp = inspect_path(_backing(tmp_path))
    assert insp.backing_file == str(tmp_path / "base.raw")
    assert insp.qcow2 is not None and insp.qcow2.backing_format == "raw"


# ----------------------------------------------------------------------------- valid

VALID: list[tuple[str, str, str, tuple[str, ...]]] = [
    # (id, qemu format, glance declared, create options)
    ("qcow2-v3", "qcow2", "qcow2", ()),
    ("qcow2-v2", "qcow2", "qcow2", ("-o", "compat=0.10")),
    ("qcow2-512", "qcow2", "qcow2", ("-o", "cluster_size=512")),
    ("qcow2-2M", "qcow2", "qcow2", ("-o", "cluster_size=2M")),
    ("qcow2-lazy", "qcow2", "qcow2", ("-o", "lazy_refcounts=on")),
    ("qcow2-extl2", "qcow2", "qcow2", ("-o", "extended_l2=on,cluster_size=128k")),
    ("qcow2-zstd", "qcow2", "qcow2", ("-o", "compression_type=zstd")),
    ("qcow2-refcount1", "qcow2", "qcow2", ("-o", "refcount_bits=1")),
    ("qcow2-prealloc", "qcow2", "qcow2", ("-o", "preallocation=metadata")),
    ("raw", "raw", "raw", ()),
    ("vmdk-sparse", "vmdk", "vmdk", ()),
    ("vmdk-stream", "vmdk", "vmdk", ("-o", "subformat=streamOptimized")),
    ("vpc-dynamic", "vpc", "vhd", ()),
    ("vpc-fixed", "vpc", "vhd", ("-o", "subformat=fixed")),
    ("vpc-force-size", "vpc", "vhd", ("-o", "force_size=on")),
    ("vhdx", "vhdx", "vhdx", ()),
    ("vhdx-fixed", "vhdx", "vhdx", ("-o", "subformat=fixed")),
    ("vdi", "vdi", "vdi", ()),
    ("vdi-static", "vdi", "vdi", ("-o", "static=on")),
]


@pytest.mark.parametrize("how", ["create", "convert"])
@pytest.mark.parametrize(
    ("qemu_fmt", "declared", "options"), [v[1:] for v in VALID], ids=[v[0] for v in VALID]
)
def test_qemu_built_valid_images_are_safe(
    tmp_path: Path,
    data_raw: Path,
    qemu_fmt: str,
    declared: str,
    options: tuple[str, ...],
    how: str,
) -> None:
    path = tmp_path / f"img.{qemu_fmt}"
    if how == "create":
        create(path, qemu_fmt, "33M", *options)
    else:
        qemu_img("convert", "-q", "-f", "raw", "-O", qemu_fmt, *options, data_raw, path)
    insp = inspect_path(path)
    verdict = check(declared, insp)
    assert verdict.safe, verdict.failures
    info = qemu_info(path, qemu_fmt)
    assert insp.virtual_size == info["virtual-size"]
    if "cluster-size" in info:
        assert insp.cluster_size == info["cluster-size"]
    # Any other declaration of a non-raw image is refused.
    for other in GLANCE_DISK_FORMATS:
        if GLANCE_DISK_FORMATS[other] != insp.format and insp.format != "raw":
            assert not check(other, insp).safe
    # Streaming the whole file in odd chunks gives the same inspection.
    streamed = Inspector()
    with path.open("rb") as f:
        while chunk := f.read(65521):
            streamed.feed(chunk)
    assert streamed.finish() == insp


def test_qemu_overlay_on_qcow2_base_is_refused_but_base_is_safe(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "qcow2", "64M")
    top = create(tmp_path / "top.qcow2", "qcow2", "128M", "-F", "qcow2", "-b", str(base))
    assert check("qcow2", inspect_path(base)).safe
    top_insp = inspect_path(top)
    assert top_insp.virtual_size == qemu_virtual_size(top, "qcow2") == 128 * MiB
    assert [f.code for f in check("qcow2", top_insp).failures] == ["backing-file"]


def test_qemu_bitmaps_and_snapshots_are_fine(tmp_path: Path, data_raw: Path) -> None:
    path = tmp_path / "img.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", data_raw, path)
    qemu_img("bitmap", "--add", "-f", "qcow2", path, "dirty0")
    qemu_img("snapshot", "-c", "snap1", path)
    insp = inspect_path(path)
    assert insp.qcow2 is not None
    assert insp.qcow2.has_bitmaps_extension and insp.qcow2.nb_snapshots == 1
    assert check("qcow2", insp).safe


def test_qemu_image_cut_short_is_refused(tmp_path: Path, data_raw: Path) -> None:
    path = tmp_path / "img.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", data_raw, path)
    with path.open("r+b") as f:
        f.truncate(65536 + 512)  # header cluster and a sliver of the refcount table
    codes = {f.code for f in check("qcow2", inspect_path(path)).failures}
    assert "refcount-table-past-end" in codes and "l1-table-past-end" in codes
