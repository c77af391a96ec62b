"""Entry point: ``cowfleet <group> <command> ...``.

The CLI is thin: each group module (disk, image, images, cache, server) registers
its commands; handlers call the library and render. Errors from the one
exception tree map to documented exit codes (``docs/exit-codes.md``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cowfleet import __version__
from cowfleet.cli.common import build_config
from cowfleet.errors import CowfleetError

log = logging.getLogger("cowfleet")

# group name -> module providing ``register(subparsers)``
GROUPS: dict[str, str] = {
    "disk": "cowfleet.cli.disk",
    "image": "cowfleet.cli.image",
    "images": "cowfleet.cli.images",
    "cache": "cowfleet.cli.cache",
    "server": "cowfleet.cli.server",
    "flavor": "cowfleet.cli.flavor",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cowfleet",
        description="Copy-on-write VM disks on a per-node image cache.",
    )
    parser.add_argument("--version", action="version", version=f"cowfleet {__version__}")
    sub = parser.add_subparsers(dest="group", metavar="GROUP")
    for _name, modname in GROUPS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # group not built yet
            raise
        mod.register(sub)
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def dispatch(args: argparse.Namespace) -> int:
    """Build the configuration, run the handler, map the error tree to exit codes."""
    try:
        cfg = build_config(args)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(getattr(args, "verbose", 0))
    return dispatch(args)
