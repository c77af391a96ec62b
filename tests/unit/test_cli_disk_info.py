"""``cowfleet disk info`` and ``cowfleet disk overlay`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cowfleet.cli.disk_info import parse_size
from cowfleet.cli.main import main
from cowfleet.errors import UsageError
from cowfleet.formats.qcow2 import parse_header

MiB = 1024**2
GiB = 1024**3


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWFLEET_HOME", str(tmp_path / "home"))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    p = tmp_path / "base.raw"
    with p.open("wb") as f:
        f.truncate(64 * MiB)
    return p


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1073741824", GiB),
        ("20G", 20 * GiB),
        ("20g", 20 * GiB),
        ("512M", 512 * MiB),
        ("64k", 65536),
        ("1.5G", 1536 * MiB),
        ("2T", 2 * 1024 * GiB),
        ("4096b", 4096),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1", "1.5", "1X", "1 GiB", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_overlay_then_info_json(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "disk"
    rc = main(
        [
            "disk",
            "overlay",
            "--backing",
            str(base),
            "--backing-format",
            "raw",
            "--size",
            "20G",
            "--cluster-size",
            "128K",
            "--output",
            "json",
            str(out),
        ]
    )
    assert rc == 0
    created = json.loads(capsys.readouterr().out)
    assert created == {
        "path": str(out),
        "virtual_size": 20 * GiB,
        "cluster_size": 131072,
        "backing": str(base),
        "backing_format": "raw",
    }
    h = parse_header(out.read_bytes())
    assert h.backing_file == str(base) and h.cluster_size == 131072

    assert main(["disk", "info", "--output", "json", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 20 * GiB
    assert info["cluster-size"] == 131072
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"
    assert info["format-specific"]["data"]["compat"] == "1.1"


def test_overlay_default_size_and_relative_backing(
    tmp_path: Path,
    base: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "disk",
                "overlay",
                "--backing",
                "base.raw",
                "--backing-format",
                "raw",
                "--lazy-refcounts",
                "disk",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out
    assert line.startswith("Formatting 'disk', fmt=qcow2 cluster_size=65536 ")
    assert f"size={64 * MiB} backing_file={base} backing_fmt=raw lazy_refcounts=on" in line
    h = parse_header((tmp_path / "disk").read_bytes())
    assert h.backing_file == str(base)  # recorded absolute
    assert h.virtual_size == 64 * MiB and h.lazy_refcounts


def test_info_human_and_chain(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "disk"
    assert (
        main(
            [
                "disk",
                "overlay",
                "--backing",
                str(base),
                "--backing-format",
                "raw",
                "--size",
                "1G",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["disk", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"image: {out}\nfile format: qcow2\nvirtual size: 1 GiB (1073741824 bytes)\n" in text
    assert f"backing file: {base}\nbacking file format: raw\n" in text
    assert main(["disk", "info", "--backing-chain", "--output", "json", str(out)]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [c["format"] for c in chain] == ["qcow2", "raw"]
    assert chain[1]["filename"] == str(base)
    assert main(["disk", "info", "--backing-chain", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"\n\nimage: {base}\nfile format: raw\n" in text


def test_overlay_refusals_exit_codes(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "disk"
    # smaller than the backing file: ValidationError -> 6
    assert (
        main(
            [
                "disk",
                "overlay",
                "--backing",
                str(base),
                "--backing-format",
                "raw",
                "--size",
                "1M",
                str(out),
            ]
        )
        == 6
    )
    assert "smaller than the backing" in capsys.readouterr().err
    # unknown backing format: UsageError -> 2
    assert (
        main(["disk", "overlay", "--backing", str(base), "--backing-format", "qed", str(out)]) == 2
    )
    # missing backing: MissingFileError -> 2 (the same code as every missing file)
    assert (
        main(
            [
                "disk",
                "overlay",
                "--backing",
                str(tmp_path / "nope"),
                "--backing-format",
                "raw",
                str(out),
            ]
        )
        == 2
    )
    # a backing file that is not what it claims: the policy refuses -> 3
    assert (
        main(["disk", "overlay", "--backing", str(base), "--backing-format", "qcow2", str(out)])
        == 3
    )
    assert "refused" in capsys.readouterr().err
    assert not out.exists()
    # bad cluster size is an argparse error
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "disk",
                "overlay",
                "--backing",
                str(base),
                "--backing-format",
                "raw",
                "--cluster-size",
                "lots",
                str(out),
            ]
        )
    assert exc.value.code == 2


def test_overlay_on_backing_with_its_own_backing_is_refused(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mid = tmp_path / "mid"
    assert (
        main(["disk", "overlay", "--backing", str(base), "--backing-format", "raw", str(mid)]) == 0
    )
    capsys.readouterr()
    rc = main(
        [
            "disk",
            "overlay",
            "--backing",
            str(mid),
            "--backing-format",
            "qcow2",
            str(tmp_path / "top"),
        ]
    )
    assert rc == 3
    assert "backing" in capsys.readouterr().err


def test_info_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["disk", "info", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_works_without_qemu_img(
    tmp_path: Path,
    base: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No subprocess at all: an empty PATH and a failing subprocess module change nothing."""
    import subprocess

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("disk info/overlay must not run a program")

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    out = tmp_path / "disk"
    assert (
        main(["disk", "overlay", "--backing", str(base), "--backing-format", "raw", str(out)]) == 0
    )
    assert main(["disk", "info", "--backing-chain", "--output", "json", str(out)]) == 0
    assert "qcow2" in capsys.readouterr().out
