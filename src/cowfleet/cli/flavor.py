"""``cowfleet flavor list|show|create|delete``: this node's flavors, or the compute API's.

Without a compute API, ``list`` shows the built-in and configured flavors; with one
(``COWFLEET_API_URL``, ``--api-url``), every command goes through it.
"""

from __future__ import annotations

import argparse

from cowfleet.cli import compute_api
from cowfleet.cli.common import Handler, add_command, add_group, print_json, print_table
from cowfleet.compute.flavors import all_flavors
from cowfleet.config import Config
from cowfleet.errors import UsageError


def _list(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.flavor_list(args, cfg)
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
    ls = add_command(
        fsub,
        "list",
        _list,
        "list flavors (built-in m1.* and those in the config file, or the API's)",
    )
    compute_api.add_api_options(ls)
    sh = add_command(
        fsub, "show", _api_only(compute_api.flavor_show), "show a flavor (compute API)"
    )
    compute_api.add_api_options(sh)
    sh.add_argument("flavor", metavar="NAME|ID")
    cr = add_command(
        fsub, "create", _api_only(compute_api.flavor_create), "create a flavor (compute API, admin)"
    )
    compute_api.add_api_options(cr)
    cr.add_argument("--vcpus", type=int, required=True, metavar="N", help="in vCPUs")
    cr.add_argument("--ram", type=int, required=True, metavar="MIB", help="memory in MiB")
    cr.add_argument("--disk", type=int, default=0, metavar="GIB", help="root disk in GiB")
    cr.add_argument("--ephemeral", type=int, default=0, metavar="GIB", help="in GiB (default 0)")
    cr.add_argument("--swap", type=int, default=0, metavar="MIB", help="in MiB (default 0)")
    cr.add_argument("--id", metavar="ID", help="flavor id (default: the name)")
    cr.add_argument("name", metavar="NAME")
    de = add_command(
        fsub, "delete", _api_only(compute_api.flavor_delete), "delete a flavor (compute API, admin)"
    )
    compute_api.add_api_options(de)
    de.add_argument("flavor", metavar="NAME|ID")


def _api_only(handler: Handler) -> Handler:
    """A command that exists only through the compute API (exit 2 without one)."""

    def run(args: argparse.Namespace, cfg: Config) -> int:
        if not compute_api.configured(cfg):
            raise UsageError(
                f"flavor {args.command} needs the compute API (COWFLEET_API_URL or --api-url)"
            )
        return handler(args, cfg)

    return run
