"""``cowfleet serve node``: the node agent (docs/node-agent.md)."""

from __future__ import annotations

import argparse
import logging

from cowfleet.cli.common import add_command, add_setting
from cowfleet.config import Config

# Every option is a setting (settings_table); order as in `serve node --help`.
SETTINGS = (
    "node_api_url",
    "node_token_file",
    "image_url",
    "node_host",
    "node_port",
    "instances_path",
    "driver",
    "libvirt_uri",
    "virt_type",
    "node_hostname",
    "node_vcpus",
    "node_ram_mb",
    "node_disk_gb",
    "node_build_workers",
)


def serve_node(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.node.service import NodeService

    if getattr(args, "verbose", 0) == 0:  # a daemon says what it does
        logging.getLogger("cowfleet").setLevel(logging.INFO)
    return NodeService(cfg).run()


def add_serve_node(cmds: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    """The command that runs the node agent, named ``name`` in the group ``cmds``."""
    p = add_command(
        cmds,
        name,
        serve_node,
        "run the node agent: register with the compute API, build servers, manage the cache",
        output=False,
    )
    for setting in SETTINGS:
        add_setting(p, setting)
