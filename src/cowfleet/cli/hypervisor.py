"""``cowfleet hypervisor list``: the compute API's nodes, their usage and cached images."""

from __future__ import annotations

import argparse

from cowfleet.cli import compute_api
from cowfleet.cli.common import add_command, add_group


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    hsub = add_group(sub, "hypervisor")
    hsub.required = True
    ls = add_command(
        hsub, "list", compute_api.hypervisor_list, "list the fleet's nodes (compute API)"
    )
    compute_api.add_api_options(ls)
