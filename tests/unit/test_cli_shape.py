"""The CLI's shape: one verb for servers, common options anywhere, units in --help, narrow tables.

CLI runs go through ``cowfleet.cli.main.main`` (the entry point's function) or
``python3 -m cowfleet`` in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cowfleet import settings_table
from cowfleet.cache.cache import ImageCache
from cowfleet.cli import images as images_cli
from cowfleet.cli.main import build_parser, main
from cowfleet.config import Config
from cowfleet.formats.overlay import create_overlay
from tests.unit._cache_fakes import FakeClient, image_for


@pytest.fixture(autouse=True)
def _no_cowfleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("COWFLEET_")]:
        monkeypatch.delenv(var)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "cowfleet", *argv], capture_output=True, text=True, env=env
    )


# -- serve images ------------------------------------------------------------------------
def test_serve_images_is_listed_and_images_serve_is_a_hidden_alias() -> None:
    top = _run("--help")
    assert top.returncode == 0
    groups = top.stdout.split("GROUP", 2)[-1]
    assert "serve " in groups and "\n    images" not in groups
    assert "images" not in [line.split()[0] for line in groups.splitlines() if line.strip()]
    serve = _run("serve", "--help")
    assert serve.returncode == 0 and "images" in serve.stdout
    for argv in (("serve", "images", "--help"), ("images", "serve", "--help")):
        done = _run(*argv)
        assert done.returncode == 0, done.stderr
        assert "--port PORT" in done.stdout and "--data-dir DIR" in done.stdout


def test_group_help_is_the_same_whether_or_not_the_group_is_imported() -> None:
    from cowfleet.cli.common import GROUP_HELP

    lazy = build_parser(["disk"]).format_help()  # every other group listed, not imported
    full = build_parser([]).format_help()
    assert lazy == full
    for name, text in GROUP_HELP.items():
        assert text.split()[0] in full, name


def test_a_group_without_its_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cowfleet serve") and "images" in err
    assert main([]) == 2
    assert "GROUP" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "images"], ["images", "serve"]])
def test_both_spellings_run_the_image_service(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    def fake_serve(args: argparse.Namespace, cfg: Config) -> int:
        seen.append((cfg.images_host, cfg.images_port))
        return 0

    monkeypatch.setattr(images_cli, "serve", fake_serve)
    assert main([*argv, "--port", "9393", "--home", str(tmp_path)]) == 0
    assert seen == [("127.0.0.1", 9393)]


def test_old_spelling_reports_bad_values_like_the_new(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["serve", "images"], ["images", "serve"]):
        assert main([*argv, "--port", "0", "--home", str(tmp_path)]) == 2
        assert "images_port = 0 (from command-line flag --port)" in capsys.readouterr().err


# -- common options before or after the group -----------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "cache", "list"],
        ["cache", "-v", "list"],
        ["cache", "list", "-v"],
        ["--home", "H", "-o", "json", "cache", "list"],
        ["cache", "--home", "H", "list", "--output", "json"],
        ["cache", "list", "--home", "H", "-o", "json"],
    ],
)
def test_common_options_before_or_after_the_group(argv: list[str]) -> None:
    args = build_parser(argv).parse_args(argv)
    from cowfleet.cli.common import fill_common_defaults

    args = fill_common_defaults(args)
    assert args.handler.__name__ == "cmd_list"
    if "-v" in argv:
        assert (args.verbose, args.output, args.home) == (1, "human", None)
    else:
        assert (args.verbose, args.output, args.home) == (0, "json", Path("H"))


def test_the_later_common_option_wins_and_an_absent_one_keeps_the_earlier() -> None:
    from cowfleet.cli.common import fill_common_defaults

    argv = ["--home", "A", "-o", "json", "cache", "list", "--home", "B"]
    args = fill_common_defaults(build_parser(argv).parse_args(argv))
    assert (args.home, args.output) == (Path("B"), "json")


def test_common_options_anywhere_through_the_entry_point(tmp_path: Path) -> None:
    home = str(tmp_path)
    inst = str(tmp_path / "inst")
    for argv in (
        ["-o", "json", "--home", home, "cache", "list", "--instances-path", inst],
        ["cache", "-o", "json", "--home", home, "list", "--instances-path", inst],
        ["cache", "list", "-o", "json", "--home", home, "--instances-path", inst],
        ["--config", str(tmp_path / "c.toml"), "cache", "list"],
    ):
        if argv[0] == "--config":
            (tmp_path / "c.toml").write_text(f'home = "{home}"\ninstances_path = "{inst}"\n')
            argv = [*argv, "-o", "json"]
        done = _run(*argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert json.loads(done.stdout) == []
    nope = str(tmp_path / "nope")
    for argv in (["-vv", "disk", "info", nope], ["disk", "-vv", "info", nope]):
        verbose = _run(*argv, "--home", home)
        assert verbose.returncode == 2 and "DEBUG cowfleet: details" in verbose.stderr
    quiet = _run("disk", "info", nope, "--home", home)
    assert quiet.returncode == 2 and "DEBUG" not in quiet.stderr


# -- every option's help names its unit and its choices --------------------------------
UNITS = ("GiB", "MiB", "bytes", "seconds", "K/M/G/T", "servers", "vCPUs")
NUMERIC = {"min_disk", "min_ram", "size", "cluster_size", "min_age", "timeout"}


def _leaves(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, argparse.Action]]:
    out: list[tuple[str, argparse.Action]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _leaves(sub, f"{path} {name}".strip())
        elif action.option_strings:
            out.append((path, action))
    return out


def test_every_option_names_its_unit_and_its_choices() -> None:
    problems = []
    for where, action in _leaves(build_parser([])):
        flag = f"{where} {max(action.option_strings, key=len)}"
        text = action.help or ""
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if not text:
            problems.append(f"{flag}: no help")
            continue
        if action.choices and not all(str(c) in text for c in action.choices):
            problems.append(f"{flag}: help does not name every choice {list(action.choices)}")
        row = settings_table.BY_NAME.get(action.dest)
        numeric = action.dest in NUMERIC or action.type in (int, float)
        if row is not None and row.unit and row.unit not in text:
            problems.append(f"{flag}: help does not name the unit {row.unit}")
        elif row is None and numeric and not any(u in text for u in UNITS):
            problems.append(f"{flag}: a number whose help names no unit")
    assert problems == []


def test_setting_options_help_comes_from_the_table() -> None:
    parser = build_parser(["node"])
    [(_, action)] = [
        (w, a) for w, a in _leaves(parser) if w == "node run" and a.dest == "node_interval"
    ]
    row = settings_table.BY_NAME["node_interval"]
    assert action.help == settings_table.flag_help(row)
    assert "in seconds" in (action.help or "") and "COWFLEET_NODE_INTERVAL" in (action.help or "")


# -- tables fit a terminal -------------------------------------------------------------
@pytest.mark.parametrize(
    ("sources", "summary"),
    [
        ((), "-"),
        (("disk /i/a/disk",), "1 disk"),
        (
            ("disk /i/a/disk", "disk /i/b/disk", "libvirt domain web", "pin"),
            "2 disks, 1 domain, pin",
        ),
        (("process 5 qemu", "process 6 nbd"), "2 processes"),
    ],
)
def test_in_use_sources_are_counted_by_kind(sources: tuple[str, ...], summary: str) -> None:
    from cowfleet.cli.cache import in_use_summary

    assert in_use_summary(sources) == summary


def test_a_table_cuts_the_named_column_to_fit(capsys: pytest.CaptureFixture[str]) -> None:
    from cowfleet.cli.common import print_table

    rows = [("x" * 30, "n" * 200, "y")]
    print_table(("A", "Name", "B"), rows, shrink=1, width=80)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) == 80
    assert lines[2].split()[1].endswith("...")
    print_table(("A", "Name", "B"), rows)  # no shrink: nothing is cut
    assert "n" * 200 in capsys.readouterr().out


def _base_with_users(tmp_path: Path, users: int, name: str) -> tuple[Path, str]:
    inst = tmp_path / "inst"
    data = os.urandom(100_000)
    client = FakeClient()
    iid = str(uuid.uuid4())
    client.add(image_for(iid, data, name=name), data)
    cfg = Config(home=tmp_path, instances_path=inst)
    base = ImageCache(cfg, client).ensure_cached(iid).path  # type: ignore[arg-type]
    for _ in range(users):
        folder = inst / str(uuid.uuid4())
        folder.mkdir()
        create_overlay(folder / "disk", base, "raw")
    return inst, iid


def test_cache_list_fits_120_columns_with_10_users_and_long_lists_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_name = "ubuntu-24.04-server-cloudimg-amd64-with-a-long-name"
    inst, iid = _base_with_users(tmp_path, 10, long_name)
    common = ["--home", str(tmp_path), "--instances-path", str(inst)]
    assert main(["cache", "list", *common]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120, out
    [row] = [line for line in lines if iid in line]
    assert " 10 disks " in row and "ubuntu-24.04" in row and " s ago " in row

    assert main(["cache", "list", "--long", *common]) == 0
    long_out = capsys.readouterr().out
    folders = sorted(p.name for p in inst.iterdir() if p.name not in ("_base", "locks"))
    folders = [f for f in folders if not f.startswith(".")]
    assert len(folders) == 10
    assert all(f"{inst / f / 'disk'}" in long_out for f in folders)
    assert long_name in long_out

    assert main(["cache", "list", "-o", "json", *common]) == 0
    [entry] = [e for e in json.loads(capsys.readouterr().out) if e["image_id"] == iid]
    assert len(entry["users"]) == 10 and len(entry["in_use_by"]) == 10
    assert {"format", "virtual_size", "name", "path"} <= set(entry)


def test_a_table_cuts_several_columns_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    from cowfleet.cli.common import MIN_SHRUNK, print_table

    rows = [("x" * 30, "n" * 40, "w" * 200)]
    print_table(("A", "Name", "Why"), rows, shrink=(1, 2), width=100)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) == 100
    _a, name, why = lines[2].split()
    assert name == "n" * (MIN_SHRUNK - 3) + "..."  # the first named is cut to its floor first
    assert why == "w" * (100 - 2 - 30 - MIN_SHRUNK - 6 - 3) + "..."
    print_table(("A", "Name", "Why"), [("x", "n" * 40, "w" * 30)], shrink=(1, 2), width=100)
    assert "n" * 40 in capsys.readouterr().out  # fits: nothing is cut


def test_cache_clean_fits_120_columns_and_long_shows_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_name = "ubuntu-24.04-server-cloudimg-amd64-with-a-long-name"
    inst, iid = _base_with_users(tmp_path, 10, long_name)
    # an unused base too, whose reason is long (its age and the limit)
    data = os.urandom(70_000)
    client = FakeClient()
    free_id = str(uuid.uuid4())
    client.add(image_for(free_id, data, name="free-" + "x" * 60), data)
    free = ImageCache(Config(home=tmp_path, instances_path=inst), client).ensure_cached(free_id)  # type: ignore[arg-type]
    common = ["--home", str(tmp_path), "--instances-path", str(inst), "--min-age", "0"]

    for dry in (["--dry-run"], []):
        assert main(["cache", "clean", *dry, *common]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 120, out
        [used] = [line for line in lines if iid in line]
        assert "kept" in used and "ubuntu-24" in used and "in use by 10" in used
        if dry:
            [gone] = [line for line in lines if free_id in line]
            assert "would be removed" in gone and "free-xxx" in gone
            assert main(["cache", "clean", "--long", *dry, *common]) == 0
            long_out = capsys.readouterr().out
            assert long_name in long_out and free.path.name in long_out
            users = [f for f in inst.iterdir() if f.name not in ("_base", "locks")]
            users = [f for f in users if not f.name.startswith(".")]
            assert len(users) == 10
            assert all(f"{f / 'disk'}" in long_out for f in users)
    assert not free.path.exists()
