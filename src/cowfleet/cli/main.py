"""Entry point: ``cowfleet [common options] <group> <command> ...``.

The CLI is thin: each group module (disk, image, cache, server, serve ...)
registers its commands; handlers call the library and render. The common
options (``--config``, ``--home``, ``-v``, ``--output``) are taken before or
after the group and the command. Errors from the one exception tree map to
documented exit codes (``docs/exit-codes.md``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cowfleet import __version__
from cowfleet.cli.common import (
    GROUP_HELP,
    Parser,
    build_config,
    common_parent,
    fill_common_defaults,
)
from cowfleet.errors import CowfleetError

log = logging.getLogger("cowfleet")

# group name -> module providing ``register(subparsers)``, in --help order (the one-line
# help of each is GROUP_HELP's; a group without one is a hidden alias)
GROUPS: dict[str, str] = {
    "disk": "cowfleet.cli.disk",
    "image": "cowfleet.cli.image",
    "serve": "cowfleet.cli.serve",
    "images": "cowfleet.cli.images",  # hidden: `images serve`, the old `serve images`
    "cache": "cowfleet.cli.cache",
    "server": "cowfleet.cli.server",
    "flavor": "cowfleet.cli.flavor",
    "hypervisor": "cowfleet.cli.hypervisor",
    "node": "cowfleet.cli.node",
    "demo": "cowfleet.cli.demo",
    "doctor": "cowfleet.cli.doctor",
}


def _register(sub: argparse._SubParsersAction, modname: str) -> bool:  # type: ignore[type-arg]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            return False  # group not built yet
        raise
    mod.register(sub)
    return True


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the group named in ``argv`` is imported.

    Importing every group costs tens of milliseconds (the server, libvirt and
    HTTP stacks); a node running many ``cowfleet cache fetch`` at once should
    pay only for the group it runs.
    """
    parser = Parser(
        prog="cowfleet",
        description="Copy-on-write VM disks on a per-node image cache.",
        parents=[common_parent()],
    )
    parser.add_argument("--version", action="version", version=f"cowfleet {__version__}")
    sub = parser.add_subparsers(dest="group", metavar="GROUP")
    first = group_in(argv or ())
    for name, modname in GROUPS.items():
        help_text = GROUP_HELP.get(name)
        if first is None or first not in GROUPS or name == first:
            _register(sub, modname)
        elif help_text is not None:
            sub.add_parser(name, help=help_text)  # listed in --help, not imported
        else:
            sub.add_parser(name)  # a hidden alias: not listed
    return parser


# Common options that take a value (the next word is not the group).
_VALUED = frozenset({"--config", "--home", "--output", "-o"})


def group_in(argv: Sequence[str]) -> str | None:
    """The group ``argv`` names, past any common options before it (``-v --home DIR cache``)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _setup_logging(verbose: int, fmt: str = "text") -> None:
    from cowfleet import logs

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logs.configure(level, fmt, stream=sys.stderr)


def dispatch(args: argparse.Namespace) -> int:
    """Build the configuration, run the handler, map the error tree to exit codes."""
    try:
        cfg = build_config(args)
        if cfg.log_format != "text":  # the setting is known only now
            _setup_logging(getattr(args, "verbose", 0), cfg.log_format)
        rc: int = args.handler(args, cfg)
        return rc
    except CowfleetError as exc:
        print(f"cowfleet: error: {exc}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cowfleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = fill_common_defaults(parser.parse_args(argv))
    if getattr(args, "handler", None) is None:
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return 2
    _setup_logging(getattr(args, "verbose", 0))
    return dispatch(args)
