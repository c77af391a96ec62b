"""Shared CLI plumbing: common options, building the config, rendering output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from cowfleet import config as config_mod
from cowfleet import settings_table
from cowfleet.config import Config

Handler = Callable[[argparse.Namespace, Config], int]


class Parser(argparse.ArgumentParser):
    """An argument parser that remembers which option sets each destination.

    A bad value for a setting then names the flag the user typed (``--port``),
    not the setting's own name (``images_port``). Sub-parsers inherit the class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flag_names: dict[str, str] = {}  # before __init__ adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.flag_names[action.dest] = max(action.option_strings, key=len)
        return action


# Options every parser takes (root, group and command), so they may come before or after
# the group: ``cowfleet -v cache list``, ``cowfleet cache -v list``, ``cowfleet cache list -v``.
# Their defaults are SUPPRESS so a parser that does not see one leaves the value an
# earlier one set; the latest given wins. :func:`fill_common_defaults` fills the rest.
COMMON_DEFAULTS: dict[str, Any] = {"config": None, "home": None, "verbose": 0, "output": "human"}
OUTPUT_CHOICES = ("human", "json")


def common_parent(*, output: bool = True) -> argparse.ArgumentParser:
    """The common options: ``--config``, ``--home``, ``-v``, ``--output`` (if it prints)."""
    p = Parser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("common options (before or after the group and command)")
    g.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (env COWFLEET_CONFIG)",
    )
    add_setting(g, "home")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="more logging: -v info, -vv debug (default: warnings)",
    )
    if output:
        g.add_argument(
            "--output",
            "-o",
            choices=OUTPUT_CHOICES,
            help="output format, one of human, json (default: human)",
        )
    return p


def fill_common_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Give the common options their defaults where no parser set them."""
    for name, value in COMMON_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def add_setting(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *, extra: str = ""
) -> argparse.Action:
    """The option for setting ``name``: its flags, type, choices and help from its row.

    The option's ``dest`` is the setting's name, so :func:`build_config` passes it
    on as a flag (and an error names the flag typed).
    """
    row = settings_table.BY_NAME[name]
    if not row.flags:
        raise ValueError(f"setting {name} has no command-line flag in its row")
    kw: dict[str, Any] = {"dest": row.name, "help": settings_table.flag_help(row, extra)}
    if row.kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif row.choices:
        kw["choices"] = row.choices
    else:
        kw["metavar"] = row.metavar or row.name.upper()
    if row.kind in (int, float, Path):
        kw["type"] = row.kind
    return p.add_argument(*row.flags, **kw)


def add_instances_path(p: argparse.ArgumentParser) -> None:
    """``--instances-path DIR`` (the ``instances_path`` setting)."""
    add_setting(p, "instances_path")


# The one-line help of each top-level group (``cowfleet --help`` lists them whether or
# not their module is imported). A group with no entry is a hidden alias.
GROUP_HELP: dict[str, str] = {
    "disk": "inspect disks, check image safety, create overlays",
    "image": "manage images in the image service (Glance v2 API; embedded or real Glance)",
    "serve": "server processes: image service, compute API, node agent (serve images|api|node)",
    "cache": "the node image cache (_base)",
    "server": "instances: create, list, disks, start, stop, delete",
    "flavor": "instance sizes",
    "hypervisor": "the nodes of the compute API, with their usage",
    "node": "the long-running node process (cache manager)",
    "demo": "start an image service, upload a test guest, boot 3 instances on each of 2 "
    "nodes, then boot through a compute API onto 2 node agents, and narrate what happens "
    "(cleans up unless --keep)",
    "doctor": "check this node and say what to fix (exit 11 when a check fails)",
}


def add_group(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    """A command group (``cowfleet cache ...``) taking the common options; its sub-commands.

    Its help is ``GROUP_HELP[name]``; a name not there is a hidden group: it works but
    ``--help`` does not list it.
    """
    help_text = GROUP_HELP.get(name)
    kw: dict[str, Any] = {"parents": [common_parent()]}
    if help_text is not None:
        kw.update(help=help_text, description=help_text)
    group: argparse.ArgumentParser = sub.add_parser(name, **kw)
    group.set_defaults(help_parser=group)  # `cowfleet cache` alone prints the group's help
    return group.add_subparsers(dest="command", metavar="COMMAND")


def add_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    handler: Handler,
    help_text: str,
    *,
    output: bool = True,
) -> argparse.ArgumentParser:
    """Add a leaf command that takes the common options and runs ``handler``."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, parents=[common_parent(output=output)]
    )
    # The dict fills as the caller adds options; build_config reads it.
    p.set_defaults(handler=handler, flag_names=getattr(p, "flag_names", {}))
    return p


def build_config(args: argparse.Namespace) -> Config:
    """The configuration from ``--config``, env, and flags.

    Any parsed option whose ``dest`` is the name of a configuration setting
    (``home``, ``image_url``, ``instances_path``, ``driver``, ``virt_type``,
    ``image_token_file``, ``images_port`` ...) overrides that setting, so a
    command exposes a setting just by naming its option's dest after it.
    """
    flags = {
        name: value
        for name, value in vars(args).items()
        if name in config_mod.SETTINGS and value is not None
    }
    return config_mod.load(
        getattr(args, "config", None), flags=flags, flag_names=getattr(args, "flag_names", None)
    )


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_json(obj: Any) -> None:
    json.dump(to_jsonable(obj), sys.stdout, indent=4, sort_keys=False)
    sys.stdout.write("\n")


TABLE_WIDTH = 120  # the widest line a default table should print (a terminal, a log line)
_GAP = 3  # spaces between two columns
# A cut column keeps at least this many characters: names such as demo-ramdisk stay whole,
# a longer one still tells itself apart from its neighbours (the line may then pass width).
MIN_SHRUNK = 12


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    shrink: int | Sequence[int] | None = None,
    width: int = TABLE_WIDTH,
) -> None:
    """A plain table in the spirit of ``virsh list`` (stable, greppable, no colour).

    ``shrink``: the index of a column (a name, say), or several, whose cells are cut
    (ending ``...``) so that the lines fit ``width``, if the other columns leave them
    room (never below ``MIN_SHRUNK`` characters); several are cut in the order given.
    """
    cells = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    cut = [shrink] if isinstance(shrink, int) else list(shrink or ())
    excess = 2 + sum(widths) + _GAP * (len(widths) - 1) - width  # the rule under the headers
    floors = {i: max(len(headers[i]), MIN_SHRUNK) for i in cut}
    for i in cut:  # in the order given: the first down to its floor before the next
        take = min(excess, widths[i] - floors[i])
        if take > 0:
            widths[i] -= take
            excess -= take
    for i in cut:
        for r in cells:
            if len(r[i]) > widths[i]:
                r[i] = r[i][: widths[i] - 3] + "..."
    line = " " + "   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    print("-" * (sum(widths) + 3 * (len(widths) - 1) + 2))
    for r in cells:
        print((" " + "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip())
