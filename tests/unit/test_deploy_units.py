"""The systemd units in deploy/systemd keep their hardening (read as INI, no tools)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def _unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("path", UNITS, ids=[u.name for u in UNITS])
def test_unit_runs_sandboxed_as_its_own_user_and_restarts(path: Path) -> None:
    svc = _unit(path)["Service"]
    assert svc["User"] == "cowfleet" and svc["Group"] == "cowfleet"
    assert svc["ProtectSystem"] == "strict"
    assert svc["ReadWritePaths"].startswith("/var/lib/cowfleet/")
    # what is writable is also what the unit creates (a missing ReadWritePaths fails the start)
    state = svc["StateDirectory"].split()
    assert svc["ReadWritePaths"].removeprefix("/var/lib/") in state
    assert svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectHome"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""
    assert svc["ExecStart"].startswith("/usr/local/bin/cowfleet --config /etc/cowfleet/")
    assert _unit(path)["Install"]["WantedBy"] == "multi-user.target"


def test_the_node_unit_lets_qemu_read_what_it_creates() -> None:
    svc = _unit(ROOT / "deploy" / "systemd" / "cowfleet-node.service")["Service"]
    assert svc["UMask"] == "0022" and "libvirt" in svc["SupplementaryGroups"]


def test_the_deploy_guide_configuration_examples_load(tmp_path: Path) -> None:
    import re

    from cowfleet import config

    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) == 3  # the tokens file, the controller's file, a node's file
    loaded = []
    for i, block in enumerate(blocks[1:]):
        path = tmp_path / f"deploy-example-{i}.toml"
        path.write_text(block)
        loaded.append(config.load(path, env={"COWFLEET_HOME": "/nonexistent"}))
    controller, node = loaded
    assert controller.images_tokens_file == Path("/etc/cowfleet/tokens.toml")
    assert node.node_api_url == "https://cloud.example.org/compute"
    assert node.node_token_file == Path("/etc/cowfleet/node-token")
