"""The README documents every configuration setting and every command.

Both lists are read from the code (``config.SETTINGS``, the argparse tree), so a
setting or a command added without documentation fails here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from cowfleet import config, settings_table
from cowfleet.cli.main import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[str]:
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest for a in action._choices_actions}  # hidden aliases are not listed
            for name, sub in action.choices.items():
                if name in listed:
                    out |= _leaf_commands(sub, (*prefix, name))
    if not out and prefix:
        out.add(" ".join(prefix))
    return out


def test_two_setup_commands_open_the_readme() -> None:
    text = _readme()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block and text.index("```sh") < text.index("## ")
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == [
        "sudo bash scripts/demo.sh",
        "sudo bash scripts/test.sh",
    ]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (README.parent / script).is_file()


def test_every_setting_is_in_the_configuration_table() -> None:
    section = _section(_readme(), "Configuration")
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", section, re.M)}
    assert rows, "no settings table"
    assert set(config.SETTINGS) - rows == set(), "settings missing from the README table"
    assert rows - set(config.SETTINGS) == set(), "README lists settings the code does not have"


def test_the_settings_table_is_the_generated_one() -> None:
    """The README's table is ``python3 -m cowfleet.config --markdown``, byte for byte."""
    section = _section(_readme(), "Configuration")
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    generated = settings_table.markdown_table().splitlines()
    assert lines == generated, (
        "README settings table differs from the settings table in the code; "
        "paste the output of `python3 -m cowfleet.config --markdown`"
    )


def test_config_module_prints_the_markdown_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cowfleet.config", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == settings_table.markdown_table()
    assert "| `fetch_retries` | integer | >= 0 | `5` |" in out


def test_every_command_is_in_the_command_table() -> None:
    section = _section(_readme(), "Commands")
    documented = " ".join(re.findall(r"^\| `cowfleet ([^`]*)`", section, re.M)).replace("\\|", "|")
    missing = []
    for command in sorted(_leaf_commands(build_parser([]))):
        group, _, leaf = command.partition(" ")
        pattern = rf"\b{re.escape(group)} (?:[a-z|]*\|)?{re.escape(leaf)}\b" if leaf else group
        if not re.search(pattern, documented):
            missing.append(command)
    assert missing == [], f"commands not in the README: {missing}"
