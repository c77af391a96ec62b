"""``cowfleet doctor``: check this node and say what to fix (docs/deploy.md).

Exit codes: 0 every check passed or only warned; 11 at least one check failed;
2 a configuration error (docs/exit-codes.md).
"""

from __future__ import annotations

import argparse
import sys

from cowfleet.cli.common import GROUP_HELP, add_command, add_setting, print_json
from cowfleet.config import Config

SETTINGS = (
    "node_api_url",
    "node_token_file",
    "image_url",
    "instances_path",
    "driver",
    "virt_type",
)
_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.doctor.model import exit_code
    from cowfleet.doctor.probes import real_probes
    from cowfleet.doctor.runner import run_checks

    findings = run_checks(cfg, real_probes())
    code = exit_code(findings)
    if args.output == "json":
        print_json({"ok": code == 0, "exit_code": code, "findings": findings})
        return code
    width = max(len(f.check) for f in findings)
    for f in findings:
        print(f"{_MARK[f.verdict]}  {f.check:<{width}}  {f.message}")
        if f.fix:
            print(f"{'':4}  {'':<{width}}  fix: {f.fix}")
    failed = sum(f.verdict == "fail" for f in findings)
    warned = sum(f.verdict == "warn" for f in findings)
    summary = f"{failed} failed, {warned} warned, {len(findings)} checks"
    print(summary if code == 0 else f"{summary}: this node needs fixing", file=sys.stderr)
    return code


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "doctor",
        cmd_doctor,
        GROUP_HELP["doctor"],
    )
    for setting in SETTINGS:
        add_setting(p, setting)
