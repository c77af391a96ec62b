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
from cowfleet.cli.common import Parser, build_config
from cowfleet.errors import CowfleetError

log = logging.getLogger("cowfleet")

# group name -> (module providing ``register(subparsers)``, one-line help)
GROUPS: dict[str, tuple[str, str]] = {
    "disk": ("cowfleet.cli.disk", "inspect disks, check image safety, create overlays"),
    "image": ("cowfleet.cli.image", "images in the image service (embedded or Glance)"),
    "images": ("cowfleet.cli.images", "the embedded image service (server side)"),
    "cache": ("cowfleet.cli.cache", "the node image cache (_base)"),
    "server": ("cowfleet.cli.server", "instances: create, list, disks, start, stop, delete"),
    "flavor": ("cowfleet.cli.flavor", "instance sizes"),
    "node": ("cowfleet.cli.node", "the long-running node process (cache manager)"),
    "serve": ("cowfleet.cli.serve", "long-running services: node"),
    "demo": ("cowfleet.cli.demo", "a narrated tour: image service, 2 nodes, 6 instances"),
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
    )
    parser.add_argument("--version", action="version", version=f"cowfleet {__version__}")
    sub = parser.add_subparsers(dest="group", metavar="GROUP")
    first = next((a for a in argv or () if not a.startswith("-")), None)
    for name, (modname, help_text) in GROUPS.items():
        if first is None or first not in GROUPS or name == first:
            _register(sub, modname)
        else:
            sub.add_parser(name, help=help_text)  # listed in --help, not imported
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(getattr(args, "verbose", 0))
    return dispatch(args)
