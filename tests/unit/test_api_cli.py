"""``cowfleet serve api`` refuses a bad tokens file or database before serving (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet.cli.main import main


def run(tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "serve",
            "api",
            "--data-dir",
            str(tmp_path / "api"),
            "--port",
            "1",
            "--image-url",
            "http://127.0.0.1:9",
            *extra,
        ]
    )


def test_a_missing_tokens_file_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, "--tokens-file", str(tmp_path / "nope.toml")) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err


def test_a_tokens_file_without_a_node_token_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        '[[token]]\ntoken = "admin-token-0123456789"\nproject = "a"\nrole = "admin"\n'
    )
    tokens.chmod(0o600)
    assert run(tmp_path, "--tokens-file", str(tokens)) == 2
    assert 'no role = "node" token' in capsys.readouterr().err


def test_a_tokens_file_others_can_read_is_exit_2(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\ntoken = "node-token-0123456789"\nproject = "s"\nrole = "node"\n')
    tokens.chmod(0o644)
    assert run(tmp_path, "--tokens-file", str(tokens)) == 2


def test_an_unusable_database_url_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\ntoken = "node-token-0123456789"\nproject = "s"\nrole = "node"\n')
    tokens.chmod(0o600)
    assert run(tmp_path, "--tokens-file", str(tokens), "--database", "nosuchdb://x") == 2
    assert "cannot use database URL" in capsys.readouterr().err
