"""``cowfleet disk ...``: read disks and their backing chains, check safety, write overlays."""

from __future__ import annotations

import argparse

from cowfleet.cli import disk_info, disk_inspect
from cowfleet.cli.common import add_group


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dsub = add_group(sub, "disk")
    dsub.required = True
    disk_info.register(dsub)  # info, overlay
    disk_inspect.register(dsub)  # inspect
