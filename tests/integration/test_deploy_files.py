"""The files in deploy/ pass their own tools: `systemd-analyze verify` for the units,
`promtool check rules` for the Prometheus alert rules.

`systemd-analyze verify` (package systemd; no running systemd needed) refuses a unit
whose ExecStart program does not exist. The units name `/usr/local/bin/cowfleet`,
where `pip install` as root puts the entry point on Debian; this test verifies each
unit with that path replaced by the `cowfleet` entry point actually installed here
(and nothing else changed). `verify` exits 0 on unknown keys and bad values, only
warning, so any output at all fails the test; a deliberately broken unit shows the
tool does report.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import missing, require_program

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
RULES = ROOT / "deploy" / "prometheus" / "cowfleet-alerts.yml"
UNIT_BINARY = "/usr/local/bin/cowfleet"


def _verify(tool: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "verify", *map(str, paths)], capture_output=True, text=True, timeout=120
    )


def test_systemd_units_verify_cleanly(tmp_path: Path) -> None:
    tool = require_program("systemd-analyze")
    entry = shutil.which("cowfleet")
    if entry is None:
        missing("the cowfleet entry point is not installed (pip install -e .)")
    assert entry is not None
    assert [u.name for u in UNITS] == [
        "cowfleet-api.service",
        "cowfleet-images.service",
        "cowfleet-node.service",
    ]
    copies = []
    for unit in UNITS:
        text = unit.read_text()
        assert f"ExecStart={UNIT_BINARY} " in text, unit.name
        copy = tmp_path / unit.name
        copy.write_text(text.replace(UNIT_BINARY, entry))
        copies.append(copy)
    done = _verify(tool, *copies)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )

    broken = tmp_path / "broken.service"
    broken.write_text(
        (tmp_path / "cowfleet-api.service")
        .read_text()
        .replace("Restart=on-failure", "Restart=sometimes")
        .replace("ProtectSystem=strict", "ProtectSystm=strict")
    )
    said = _verify(tool, broken)
    assert "sometimes" in said.stderr and "ProtectSystm" in said.stderr


def test_prometheus_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = require_program("promtool")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text(
        RULES.read_text().replace(
            "expr: cowfleet_node_heartbeat_age_seconds > 60",
            "expr: cowfleet_node_heartbeat_age_seconds >",
        )
    )
    assert (
        subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True).returncode != 0
    )
