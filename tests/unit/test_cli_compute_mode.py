"""Which commands need a compute API, and what they say without one (exit 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowfleet.cli.main import main


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in [v for v in os.environ if v.startswith("COWFLEET_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("COWFLEET_HOME", str(tmp_path))


@pytest.mark.parametrize(
    "argv",
    [
        ["hypervisor", "list"],
        ["server", "reboot", "vm1"],
        ["flavor", "show", "m1.tiny"],
        ["flavor", "create", "--vcpus", "1", "--ram", "64", "x"],
        ["flavor", "delete", "x"],
        ["server", "create", "--image", "i", "--flavor", "m1.tiny", "--max", "2", "vm"],
    ],
)
def test_api_only_commands_say_so_without_an_api(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "compute API" in err and ("COWFLEET_API_URL" in err or "--api-url" in err)


def test_an_api_url_without_a_token_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COWFLEET_API_URL", "http://127.0.0.1:9")
    assert main(["server", "list"]) == 2
    assert "COWFLEET_API_TOKEN" in capsys.readouterr().err


def test_an_unreachable_api_is_exit_8(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COWFLEET_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("COWFLEET_API_TOKEN", "t" * 20)
    assert main(["server", "list"]) == 8
    assert "unreachable" in capsys.readouterr().err


def test_a_token_file_others_can_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 20)
    token.chmod(0o644)
    monkeypatch.setenv("COWFLEET_API_URL", "http://127.0.0.1:9")
    assert main(["server", "list", "--api-token-file", str(token)]) == 2
    assert str(token) in capsys.readouterr().err
