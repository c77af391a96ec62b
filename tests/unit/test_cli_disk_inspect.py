"""``cowfleet disk inspect`` in-process: exit codes and output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cowfleet.cli.main import main
from tests.unit import hostile_corpus as hc


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COWFLEET_MAX_VIRTUAL_SIZE", raising=False)


def write(tmp_path: Path, data: bytes, name: str = "img") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_safe_qcow2_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, hc.qcow2(size=hc.GIB))
    assert main(["disk", "inspect", "--declared-format", "qcow2", str(p)]) == 0
    out = capsys.readouterr().out
    assert "safe" in out and "UNSAFE" not in out and str(hc.GIB) in out


def test_unsafe_names_each_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, hc.qcow2(backing=b"/etc/passwd", data_file=b"/x", incompat=4))
    assert main(["disk", "inspect", "--declared-format", "raw", str(p)]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert "UNSAFE" in lines[0]
    codes = {line.split(":")[0].strip() for line in lines[1:]}
    assert codes == {"format-mismatch", "backing-file", "data-file"}


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, hc.qcow2(backing=b'json:{"x":1}', backing_format=b"raw"))
    rc = main(["disk", "inspect", "--declared-format", "qcow2", "--output", "json", str(p)])
    assert rc == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "qcow2" and doc["safe"] is False
    assert doc["matches"] == ["qcow2"]
    assert {f["code"] for f in doc["failures"]} == {"backing-file", "json-filename"}
    assert doc["qcow2"]["backing_file"] == 'json:{"x":1}'
    assert doc["qcow2"]["backing_format"] == "raw"
    assert doc["virtual_size"] == 64 * hc.MIB
    assert doc["backing_file"] == 'json:{"x":1}' and doc["cluster_size"] == 65536
    assert doc["encryption"] is None and doc["complete"] is True


def test_json_safe_raw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, hc.gpt_disk())
    assert main(["disk", "inspect", "--declared-format", "raw", "-o", "json", str(p)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["safe"] and doc["failures"] == [] and doc["partition_table"] == "gpt"
    assert "qcow2" not in doc


def test_cap_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COWFLEET_MAX_VIRTUAL_SIZE", str(hc.MIB))
    p = write(tmp_path, hc.qcow2(size=hc.GIB))
    assert main(["disk", "inspect", "--declared-format", "qcow2", str(p)]) == 3
    assert "virtual-size-too-large" in capsys.readouterr().out


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["disk", "inspect", "--declared-format", "raw", str(tmp_path / "nope")]) == 2
    assert "cannot open" in capsys.readouterr().err


def test_directory_exits_2(tmp_path: Path) -> None:
    assert main(["disk", "inspect", "--declared-format", "raw", str(tmp_path)]) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["disk", "inspect", "x"],
        ["disk", "inspect", "--declared-format", "qcow3", "x"],
        ["disk", "inspect", "--declared-format", "raw"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2


def test_zero_byte_and_garbage_give_verdicts_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = write(tmp_path, b"", "empty")
    assert main(["disk", "inspect", "--declared-format", "raw", str(empty)]) == 3
    assert "empty" in capsys.readouterr().out
    junk = write(tmp_path, b"QFI\xfb\0\0\0\3" + b"\xff" * 100, "junk")
    assert main(["disk", "inspect", "--declared-format", "qcow2", str(junk)]) == 3
    assert "invalid-header" in capsys.readouterr().out
