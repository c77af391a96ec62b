"""One exit-code table, applied everywhere (docs/exit-codes.md is that table).

A missing local file exits 2 in every command that takes one, whatever the
command does with it (read it, inspect it, use it as a backing file, upload it).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cowfleet import errors
from cowfleet.cli.main import main
from cowfleet.formats.overlay import create_overlay

DOC = Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md"
MISSING_FILE_EXIT = 2


def _main_table() -> dict[str, int]:
    """Class name -> code, from the first table of docs/exit-codes.md."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("\n## ")[0]
    out: dict[str, int] = {}
    for m in re.finditer(r"^\| (\d+) \|.*\| ([^|]*) \|$", table, re.M):
        for name in re.findall(r"`(\w+)`", m.group(2)):
            out[name] = int(m.group(1))
    return out


def test_the_doc_table_names_every_error_class_with_its_code() -> None:
    table = _main_table()
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.CowfleetError)
    }
    assert set(table) == set(classes)
    for name, cls in classes.items():
        assert table[name] == cls.exit_code, name
    assert errors.MissingFileError.exit_code == MISSING_FILE_EXIT


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    nope = str(tmp_path / "nope")
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    orphan = tmp_path / "orphan.qcow2"  # a qcow2 whose backing file was removed
    create_overlay(orphan, base, "raw")
    base.unlink()
    return {
        "disk info": ["disk", "info", nope],
        "disk info --backing-chain (top)": ["disk", "info", "--backing-chain", nope],
        "disk info --backing-chain (backing)": ["disk", "info", "--backing-chain", str(orphan)],
        "disk inspect raw": ["disk", "inspect", "--declared-format", "raw", nope],
        "disk inspect qcow2": ["disk", "inspect", "--declared-format", "qcow2", nope],
        "disk overlay --backing": [
            "disk", "overlay", "--backing", nope, "--backing-format", "raw",
            str(tmp_path / "out.qcow2"),
        ],
        "image upload": [
            "image", "upload", "--name", "x", "--disk-format", "raw",
            "--image-url", "http://127.0.0.1:9", nope,
        ],
        "--config": ["flavor", "list", "--config", nope],
    }  # fmt: skip


def test_a_missing_file_is_the_same_code_in_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COWFLEET_HOME", str(tmp_path / "home"))
    codes = {}
    for what, argv in _commands(tmp_path).items():
        codes[what] = main(argv)
        err = capsys.readouterr().err
        assert "nope" in err or "base.raw" in err, (what, err)
        assert "Traceback" not in err
    assert codes == {what: MISSING_FILE_EXIT for what in codes}


def test_entry_point_agrees_on_missing_files(tmp_path: Path) -> None:
    env_home = ["--home", str(tmp_path / "home")]
    for argv in (["disk", "info"], ["disk", "inspect", "--declared-format", "qcow2"]):
        done = subprocess.run(
            [sys.executable, "-m", "cowfleet", *argv, *env_home, str(tmp_path / "nope")],
            capture_output=True,
            text=True,
        )
        assert done.returncode == MISSING_FILE_EXIT, (argv, done.stderr)
