"""``cowfleet serve ...``: the long-running server processes, under one verb."""

from __future__ import annotations

import argparse

from cowfleet.cli.serve_node import add_serve_node


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    group = sub.add_parser("serve", help="long-running services: node")
    cmds = group.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_node(cmds, "node")
