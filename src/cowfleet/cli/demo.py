"""``cowfleet demo``: a guided, narrated tour on this machine (see docs/demo.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cowfleet.cli.common import GROUP_HELP, add_command, add_setting
from cowfleet.config import DRIVERS, Config


def _demo(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.demo.scenario import Demo, Options
    from cowfleet.demo.transcript import Transcript

    opts = Options(
        keep=args.keep,
        driver=args.demo_driver,
        home=args.home,
        libvirt_uri=args.libvirt_uri or cfg.libvirt_uri,
        guest_cache=args.guest_cache,
    )
    return Demo(opts, Transcript(sys.stdout, bold=sys.stdout.isatty())).run()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(sub, "demo", _demo, GROUP_HELP["demo"], output=False)
    p.add_argument(
        "--keep", action="store_true", help="leave everything running and print how to remove it"
    )
    p.add_argument(
        "--driver",
        dest="demo_driver",
        choices=DRIVERS,
        help="one of libvirt (fail if unavailable), none (disks only); "
        "default: libvirt when it answers",
    )
    add_setting(p, "libvirt_uri")
    p.add_argument(
        "--guest-cache",
        type=Path,
        metavar="DIR",
        help="where the test guest is built and kept (default /var/cache/cowfleet/demo-guest)",
    )
