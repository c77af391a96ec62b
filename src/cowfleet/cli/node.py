"""``cowfleet node run``: the long-running node process (the cache manager)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from cowfleet.cli.common import add_command, add_instances_path, print_json
from cowfleet.config import Config

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.cache.manager import CacheManager

    if args.verbose == 0:  # a daemon says what each pass did
        logging.getLogger("cowfleet").setLevel(logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("node run: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        manager = CacheManager(cfg)
        if args.once:
            report = manager.run_pass(stop=stop)
            if args.output == "json":
                print_json(report)
            return 0
        manager.run(stop)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("node", help="the long-running node process")
    nsub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    rp = add_command(
        nsub,
        "run",
        cmd_run,
        "run cache passes (re-verify, quarantine, clean) every --interval seconds until SIGTERM",
    )
    rp.add_argument(
        "--interval",
        dest="node_interval",
        type=float,
        metavar="SECONDS",
        help="seconds between passes (env COWFLEET_NODE_INTERVAL; default 600)",
    )
    rp.add_argument("--once", action="store_true", help="run one pass and exit")
    add_instances_path(rp)
