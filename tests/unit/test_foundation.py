"""The subprocess wrapper, the exception tree and the CLI's error mapping."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cowfleet import errors, proc
from cowfleet.cli import main as cli_main
from cowfleet.config import Config
from cowfleet.errors import CommandError, NotFoundError, TimeoutError_


def test_run_returns_output() -> None:
    out = proc.run([sys.executable, "-c", "print('hi')"])
    assert out.returncode == 0
    assert out.stdout == "hi\n"


def test_run_never_uses_a_shell() -> None:
    out = proc.run([sys.executable, "-c", "import sys; print(sys.argv[1])", "$(echo no); ls"])
    assert out.stdout.strip() == "$(echo no); ls"


def test_failure_carries_argv_code_and_stderr() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"]
    with pytest.raises(CommandError) as info:
        proc.run(argv)
    assert info.value.returncode == 3
    assert info.value.argv == argv
    assert "boom" in info.value.stderr
    assert "boom" in str(info.value)
    assert proc.run(argv, ok_codes=(0, 3)).returncode == 3
    assert proc.run(argv, check=False).returncode == 3


def test_missing_program_and_timeout() -> None:
    with pytest.raises(NotFoundError, match="program not found"):
        proc.run(["/nonexistent/cowfleet-no-such-program"])
    with pytest.raises(TimeoutError_):
        proc.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.3)


def test_limits_are_a_prlimit_prefix_not_a_preexec_fn(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real prlimit is exercised in tests/integration/test_proc_limits.py.
    calls: list[tuple[list[str], dict[str, object]]] = []

    def fake_run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append((argv, kw))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    limits = proc.Limits(cpu_seconds=7, address_space=1536 * 1024**2)
    done = proc.run([sys.executable, "-c", "pass"], limits=limits)
    argv, kw = calls[0]
    limit_as = f"--as={1536 * 1024**2}"
    assert argv == ["prlimit", "--cpu=7", limit_as, "--", sys.executable, "-c", "pass"]
    assert "preexec_fn" not in kw
    assert done.argv == (sys.executable, "-c", "pass")  # errors and logs name the program
    proc.run([sys.executable], limits=proc.Limits(cpu_seconds=None, address_space=1 << 30))
    assert calls[1][0][:3] == ["prlimit", f"--as={1 << 30}", "--"]
    proc.run([sys.executable], limits=proc.Limits(cpu_seconds=None, address_space=None))
    proc.run([sys.executable])
    assert calls[2][0] == calls[3][0] == [sys.executable]
    with pytest.raises(NotFoundError, match="program not found: cowfleet-no-such-program"):
        proc.run(["cowfleet-no-such-program"], limits=limits)
    assert len(calls) == 4


def test_exit_codes_are_distinct_per_class() -> None:
    classes = [
        errors.UsageError,
        errors.ImageFormatError,
        errors.NotFoundError,
        errors.ConflictError,
        errors.ValidationError,
        errors.IntegrityError,
        errors.BackendUnavailableError,
        errors.CommandError,
        errors.TimeoutError_,
    ]
    codes = [c.exit_code for c in classes]
    assert len(set(codes)) == len(codes)
    assert errors.UnsafeImageError.exit_code == 3
    assert errors.StorageFullError.exit_code == 2


def _args(handler: object, **kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"config": None, "home": None, "verbose": 0, "handler": handler}
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_maps_errors_to_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def ok(args: argparse.Namespace, cfg: Config) -> int:
        assert cfg.home == tmp_path
        return 0

    assert cli_main.dispatch(_args(ok, home=tmp_path)) == 0

    missing = _args(ok, config=tmp_path / "absent.toml")
    assert cli_main.dispatch(missing) == errors.ConfigError.exit_code
    assert "configuration file not found" in capsys.readouterr().err

    def not_found(args: argparse.Namespace, cfg: Config) -> int:
        raise NotFoundError("no image named 'cirros'")

    assert cli_main.dispatch(_args(not_found)) == 4
    assert "cowfleet: error: no image named 'cirros'" in capsys.readouterr().err


def test_option_dests_named_after_settings_override_config(tmp_path: Path) -> None:
    seen: list[Config] = []

    def grab(args: argparse.Namespace, cfg: Config) -> int:
        seen.append(cfg)
        return 0

    args = _args(grab, home=tmp_path, driver="none", instances_path=tmp_path / "i", other=1)
    assert cli_main.dispatch(args) == 0
    assert seen[0].driver == "none"
    assert seen[0].base_dir == tmp_path / "i" / "_base"


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main([]) == 2
    assert "usage: cowfleet" in capsys.readouterr().err
