"""``cowfleet flavor list``: built-in and configured flavors."""

from __future__ import annotations

import argparse

from cowfleet.cli.common import add_command, add_group, print_json, print_table
from cowfleet.compute.flavors import all_flavors
from cowfleet.config import Config


def _list(args: argparse.Namespace, cfg: Config) -> int:
    flavors = all_flavors(cfg)
    if args.output == "json":
        print_json([f.to_dict() for f in flavors])
        return 0
    print_table(
        ["Name", "VCPUs", "RAM MiB", "Root GiB", "Ephemeral GiB", "Swap MiB"],
        [[f.name, f.vcpus, f.ram_mb, f.root_gb, f.ephemeral_gb, f.swap_mb] for f in flavors],
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fsub = add_group(sub, "flavor")
    fsub.required = True
    add_command(fsub, "list", _list, "list flavors (built-in m1.* and those in the config file)")
