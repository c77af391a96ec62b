"""``cowfleet node run``: the long-running node process (the cache manager)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from cowfleet.cli.common import add_command, add_group, add_instances_path, add_setting, print_json
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
    nsub = add_group(sub, "node")
    nsub.required = True
    rp = add_command(
        nsub,
        "run",
        cmd_run,
        "run cache passes (re-verify, quarantine, clean) every --interval seconds until SIGTERM",
    )
    add_setting(rp, "node_interval")
    rp.add_argument("--once", action="store_true", help="run one pass and exit")
    add_instances_path(rp)
