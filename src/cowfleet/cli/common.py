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


def common_parent(*, output: bool = True) -> argparse.ArgumentParser:
    """Options every command takes: ``--config``, ``--home``, ``--output`` (if it prints)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    g.add_argument("--home", type=Path, metavar="DIR", help="root of all state (env COWFLEET_HOME)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    if output:
        g.add_argument(
            "--output",
            "-o",
            choices=("human", "json"),
            default="human",
            help="output format (default: human)",
        )
    return p


def add_instances_path(p: argparse.ArgumentParser) -> None:
    """``--instances-path DIR`` (the ``instances_path`` setting)."""
    p.add_argument(
        "--instances-path",
        dest="instances_path",
        type=Path,
        metavar="DIR",
        help="instances path: instance folders, _base/ and locks/ (env COWFLEET_INSTANCES_PATH)",
    )


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


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A plain table in the spirit of ``virsh list`` (stable, greppable, no colour)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    line = " " + "   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    print("-" * (sum(widths) + 3 * (len(widths) - 1) + 2))
    for r in rows:
        print((" " + "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip())
