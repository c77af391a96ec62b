"""The shared tokens file: parsing, refusals, lookups and the permission check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowfleet.errors import ConfigError, LocalIOError
from cowfleet.tokens import Principal, load_tokens, parse_tokens

GOOD = """
[[token]]
token = "admin-token-0123456789"
project = "ops"
role = "admin"

[[token]]
token = "member-token-0123456789"
project = "demo"
role = "member"

[[token]]
token = "node-token-0123456789ab"
project = "fleet"
role = "node"
"""


def test_lookup_maps_each_token_to_its_project_and_role() -> None:
    table = parse_tokens(GOOD)
    assert table.lookup("admin-token-0123456789") == Principal("ops", "admin")
    assert table.lookup("member-token-0123456789") == Principal("demo", "member")
    assert table.lookup("node-token-0123456789ab") == Principal("fleet", "node")
    assert table.lookup("member-token-012345678") is None  # a prefix is not the token
    assert table.lookup("") is None
    assert table.lookup(None) is None
    assert table.first("node") == "node-token-0123456789ab"
    assert table.first("admin") == "admin-token-0123456789"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('token = "short"\nproject = "p"\nrole = "member"', "at least 16"),
        ('token = "has a space in it!!"\nproject = "p"\nrole = "member"', "printable ASCII"),
        ('token = "0123456789abcdefgh"\nproject = "../x"\nrole = "member"', "'project'"),
        ('token = "0123456789abcdefgh"\nproject = "p"\nrole = "root"', "'role' must be one of"),
        ('token = "0123456789abcdefgh"\nproject = "p"', "'role' must be one of"),
        ('token = "0123456789abcdefgh"\nproject = "p"\nrole = "admin"\nx = 1', "unknown key"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tokens(f"[[token]]\n{entry}\n", "t.toml")
    assert message in str(info.value)
    assert "t.toml, token #1" in str(info.value)


def test_a_repeated_token_and_bad_toml_are_refused() -> None:
    twice = GOOD + '\n[[token]]\ntoken = "admin-token-0123456789"\nproject = "x"\nrole = "member"\n'
    with pytest.raises(ConfigError, match="token #4 repeats"):
        parse_tokens(twice)
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_tokens("[[token]\n")
    with pytest.raises(ConfigError, match="array of tables"):
        parse_tokens('token = "x"\n')


def test_load_checks_permissions_and_refuses_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(GOOD)
    path.chmod(0o600)
    assert load_tokens(path).lookup("member-token-0123456789") == Principal("demo", "member")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="other users"):
        load_tokens(path)
    assert load_tokens(path, allow_insecure=True).first("node")
    path.chmod(0o600)
    link = tmp_path / "link.toml"
    os.symlink(path, link)
    with pytest.raises(LocalIOError, match=r"cannot read token file"):
        load_tokens(link)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokens(tmp_path / "missing.toml")
