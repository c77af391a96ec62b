"""``cowfleet serve images|node``: the long-running server processes, under one verb.

(``cowfleet images serve``, the old spelling, still works as a hidden alias.)
"""

from __future__ import annotations

import argparse

from cowfleet.cli.common import add_group
from cowfleet.cli.images import add_serve_images
from cowfleet.cli.serve_node import add_serve_node


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmds = add_group(sub, "serve")
    add_serve_images(cmds, "images")
    add_serve_node(cmds, "node")
