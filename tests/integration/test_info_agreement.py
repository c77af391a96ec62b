"""``cowfleet disk info --output json`` agrees with ``qemu-img info --output=json``.

Images are made by qemu-img (and one by cowfleet). Every key both print must be
equal, including ``actual-size`` with no tolerance: both report ``st_blocks * 512``
of the same file. The keys cowfleet leaves out would be listed in ``OMITTED`` (none now).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cowfleet import proc, qemuimg
from cowfleet.cli.main import main
from cowfleet.formats.overlay import create_overlay
from tests.conftest import require_program

MiB = 1024**2
GiB = 1024**3

# Keys qemu prints that cowfleet does not, per format (documented in docs/disks.md).
OMITTED: dict[str, set[str]] = {}


@dataclass(frozen=True)
class Case:
    name: str
    fmt: str  # qemu's -f
    make: Callable[[Path], Path]  # builds the image in a directory, returns its path


def _qemu_create(name: str, fmt: str, size: str, **opts: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / name
        args = ["qemu-img", "create", "-q", "-f", fmt]
        if opts:
            args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
        proc.run([*args, str(p), size])
        return p

    return make


def _with_data(inner: Callable[[Path], Path], fmt: str) -> Callable[[Path], Path]:
    """Write guest data through qemu-io so actual-size is not just metadata."""

    def make(d: Path) -> Path:
        p = inner(d)
        qemu_io = require_program("qemu-io")
        proc.run([qemu_io, "-f", fmt, "-c", "write -P 0x5a 0 3M", "-c", "write 100M 64k", str(p)])
        return p

    return make


def _dirty(d: Path) -> Path:
    p = _qemu_create("a.qcow2", "qcow2", "1G", lazy_refcounts="on")(d)
    with p.open("r+b") as f:  # set incompatible feature bit 0 (dirty)
        f.seek(79)
        f.write(b"\x01")
    return p


def _raw(name: str, size: int, data: bytes = b"") -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / name
        with p.open("wb") as f:
            f.write(data)
            f.truncate(size)
        return p

    return make


def _qemu_overlay_on_raw(d: Path) -> Path:
    base = _raw("base.raw", 64 * MiB, b"x" * MiB)(d)
    top = d / "top.qcow2"
    proc.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top), "1G"]
    )
    return top


def _qemu_overlay_on_qcow2_relative(d: Path) -> Path:
    sub = d / "sub"
    sub.mkdir()
    _qemu_create("base.qcow2", "qcow2", "256M")(sub)
    top = sub / "top.qcow2"
    # A relative backing name: resolved against the overlay's directory.
    proc.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            str(top),
            "512M",
        ]
    )
    return top


def _cowfleet_overlay(d: Path) -> Path:
    base = _raw("base.raw", 32 * MiB + 1000)(d)
    top = d / "cf.qcow2"
    create_overlay(top, base, "raw", size=3 * GiB + 12345, cluster_size=4096)
    return top


def _two_level_chain(d: Path) -> Path:
    base = _raw("base.raw", 16 * MiB)(d)
    mid = d / "mid.qcow2"
    create_overlay(mid, base, "raw", size=32 * MiB, backing_virtual_size=16 * MiB)
    top = d / "top.qcow2"
    create_overlay(top, mid, "qcow2", size=64 * MiB, backing_virtual_size=32 * MiB)
    return top


CASES = [
    Case("qcow2-compat-0.10", "qcow2", _qemu_create("a.qcow2", "qcow2", "1G", compat="0.10")),
    Case("qcow2-compat-1.1", "qcow2", _qemu_create("a.qcow2", "qcow2", "1G", compat="1.1")),
    *[
        Case(
            f"qcow2-cluster-{cs}",
            "qcow2",
            _qemu_create("a.qcow2", "qcow2", "3G", cluster_size=str(cs)),
        )
        for cs in (512, 4096, 65536, 262144, 1048576, 2097152)
    ],
    Case(
        "qcow2-lazy-refcounts", "qcow2", _qemu_create("a.qcow2", "qcow2", "2G", lazy_refcounts="on")
    ),
    Case(
        "qcow2-extended-l2",
        "qcow2",
        _qemu_create("a.qcow2", "qcow2", "2G", extended_l2="on", cluster_size="131072"),
    ),
    Case("qcow2-dirty-lazy-refcounts", "qcow2", _dirty),
    Case("qcow2-zstd", "qcow2", _qemu_create("a.qcow2", "qcow2", "2G", compression_type="zstd")),
    Case(
        "qcow2-refcount-bits-64",
        "qcow2",
        _qemu_create("a.qcow2", "qcow2", "1G", refcount_bits="64"),
    ),
    Case("qcow2-with-data", "qcow2", _with_data(_qemu_create("a.qcow2", "qcow2", "1G"), "qcow2")),
    Case("qcow2-odd-size", "qcow2", _qemu_create("a.qcow2", "qcow2", "1000")),
    Case("qcow2-overlay-on-raw", "qcow2", _qemu_overlay_on_raw),
    Case("qcow2-overlay-on-qcow2-relative", "qcow2", _qemu_overlay_on_qcow2_relative),
    Case("cowfleet-overlay", "qcow2", _cowfleet_overlay),
    Case("raw", "raw", _raw("a.raw", 64 * MiB, b"data" * 4096)),
    Case("raw-unaligned", "raw", _raw("a.raw", 1000, b"abc")),
    Case("vmdk-monolithic-sparse", "vmdk", _qemu_create("a.vmdk", "vmdk", "1G")),
    Case(
        "vmdk-stream-optimized",
        "vmdk",
        _qemu_create("a.vmdk", "vmdk", "1G", subformat="streamOptimized"),
    ),
    Case("vpc-dynamic", "vpc", _qemu_create("a.vhd", "vpc", "1G")),
    Case("vpc-fixed", "vpc", _qemu_create("a.vhd", "vpc", "64M", subformat="fixed")),
    Case("vhdx", "vhdx", _qemu_create("a.vhdx", "vhdx", "1G")),
    Case("vdi", "vdi", _qemu_create("a.vdi", "vdi", "1G")),
    Case("vdi-with-data", "vdi", _with_data(_qemu_create("a.vdi", "vdi", "1G"), "vdi")),
]


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    require_program("qemu-img")


def _cowfleet_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    rc = main(["disk", "info", "--output", "json", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def _assert_agree(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    fmt = theirs["format"]
    omitted = OMITTED.get(fmt, set())
    assert set(ours) == set(theirs) - omitted, (sorted(ours), sorted(theirs))
    for key in ours:
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_info_agrees_with_qemu_img(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = case.make(tmp_path)
    # Relative names as a user types them: qemu prints filename as given.
    monkeypatch.chdir(image.parent)
    name = image.name
    theirs = qemuimg.info(Path(name), case.fmt).raw
    ours = _cowfleet_json(capsys, name)
    _assert_agree(ours, dict(theirs))
    # The human text is qemu-img's, line for line.
    human = proc.run(["qemu-img", "info", "-f", case.fmt, name]).stdout
    assert main(["disk", "info", name]) == 0
    assert capsys.readouterr().out == human
    # And with an absolute path.
    theirs_abs = qemuimg.info(image, case.fmt).raw
    _assert_agree(_cowfleet_json(capsys, str(image)), dict(theirs_abs))


CHAINS = [
    ("qemu-overlay-on-raw", _qemu_overlay_on_raw),
    ("qemu-overlay-on-qcow2-relative", _qemu_overlay_on_qcow2_relative),
    ("cowfleet-two-level", _two_level_chain),
]


@pytest.mark.parametrize(("name", "make"), CHAINS, ids=[c[0] for c in CHAINS])
def test_backing_chain_agrees_with_qemu_img(
    name: str,
    make: Callable[[Path], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    top = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(top, tmp_path)
    theirs = [dict(layer.raw) for layer in qemuimg.info_chain(Path(rel), "qcow2")]
    ours = _cowfleet_json(capsys, "--backing-chain", rel)
    assert len(ours) == len(theirs) >= 2
    for mine, qemu in zip(ours, theirs, strict=True):
        _assert_agree(mine, qemu)


def test_human_output_matches_qemu_img(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    top = _qemu_overlay_on_qcow2_relative(tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(top, tmp_path)
    for extra in ([], ["--backing-chain"]):
        theirs = proc.run(["qemu-img", "info", "-f", "qcow2", *extra, rel]).stdout
        assert main(["disk", "info", *extra, rel]) == 0
        assert capsys.readouterr().out == theirs
