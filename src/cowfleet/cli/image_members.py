"""``cowfleet image member add|list|set|remove``: share images with other projects.

Glance v2's image members: the owner adds a project to a ``shared`` image, the project
accepts (``set IMAGE PROJECT accepted``, with that project's token) and then lists it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from cowfleet.cli.common import add_command, common_parent, print_json, print_table
from cowfleet.config import Config
from cowfleet.images.models import Member

STATUSES = ("accepted", "rejected", "pending")


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from cowfleet.cli.image import _endpoint_opts

    help_text = "share images with other projects (image members)"
    group = cmds.add_parser(
        "member", help=help_text, description=help_text, parents=[common_parent()]
    )
    group.set_defaults(help_parser=group)  # `cowfleet image member` alone: this help
    sub = group.add_subparsers(dest="member_command", metavar="COMMAND")

    p = add_command(sub, "add", _add, "share IMAGE with PROJECT (status pending)")
    _endpoint_opts(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("project", metavar="PROJECT")

    p = add_command(sub, "list", _list, "the projects IMAGE is shared with")
    _endpoint_opts(p)
    p.add_argument("image", metavar="IMAGE")

    p = add_command(
        sub, "set", _set, "accept or reject a shared image (as PROJECT, with its token)"
    )
    _endpoint_opts(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("project", metavar="PROJECT")
    p.add_argument("status", choices=STATUSES)

    p = add_command(sub, "remove", _remove, "stop sharing IMAGE with PROJECT", output=False)
    _endpoint_opts(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("project", metavar="PROJECT")


def _render(args: argparse.Namespace, members: Sequence[Member]) -> None:
    if args.output == "json":
        print_json(members)
        return
    print_table(
        ["Image ID", "Member ID", "Status", "Updated"],
        [(m.image_id, m.member_id, m.status, m.updated_at) for m in members],
    )


def _client(cfg: Config) -> Any:
    from cowfleet.cli import image  # its client_factory, which tests replace

    return image.client_factory(cfg)


def _add(args: argparse.Namespace, cfg: Config) -> int:
    with _client(cfg) as client:
        _render(args, [client.add_member(client.find(args.image).id, args.project)])
    return 0


def _list(args: argparse.Namespace, cfg: Config) -> int:
    with _client(cfg) as client:
        _render(args, client.list_members(client.find(args.image).id))
    return 0


def _set(args: argparse.Namespace, cfg: Config) -> int:
    with _client(cfg) as client:
        image_id = client.find(args.image).id
        _render(args, [client.set_member(image_id, args.project, args.status)])
    return 0


def _remove(args: argparse.Namespace, cfg: Config) -> int:
    with _client(cfg) as client:
        client.remove_member(client.find(args.image).id, args.project)
    return 0
