"""``cowfleet disk ...``: read disks and their backing chains, check safety, write overlays."""

from __future__ import annotations

import argparse

from cowfleet.cli import disk_info, disk_inspect


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("disk", help="inspect disks, check image safety, create overlays")
    dsub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    disk_info.register(dsub)  # info, overlay
    disk_inspect.register(dsub)  # inspect
