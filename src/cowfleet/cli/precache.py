"""``cowfleet image precache IMAGE (--aggregate A | --host H ... | --all) [--watch]``.

Asks the compute API (``POST /v2.1/cowfleet/precache``) and follows the progress
resource until every node is done. ``--watch`` shows a live table meanwhile; the final
table (or, with ``--output json``, a list of ``host``, ``state``, ``bytes_done``,
``bytes_total``, ``source``, ``error``) is printed at the end. Exit 0 when no node
failed (a skipped node is not a failure: the table says why), 8 when one did.

The API is the ``api_url`` setting (``--api-url``, ``COWFLEET_API_URL``), the token
``api_token`` or ``api_token_file`` (``COWFLEET_API_TOKEN``, ``--api-token-file``); an
admin token is needed. The calls go through :class:`cowfleet.api.client.ComputeClient`,
so its faults map to the exit codes as for every compute API command.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from cowfleet import precache as pc
from cowfleet.api.client import ComputeClient
from cowfleet.cli import compute_api
from cowfleet.cli.common import add_command, print_json, print_table
from cowfleet.config import Config
from cowfleet.errors import TimeoutError_, UsageError
from cowfleet.units import human_bytes

FAILED_EXIT = 8  # a node failed (docs/exit-codes.md)
JSON_FIELDS = ("host", "state", "bytes_done", "bytes_total", "source", "error")


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        cmds, "precache", _precache, "pre-cache an image on nodes and follow each node's progress"
    )
    p.add_argument("image", metavar="IMAGE", help="image id (or a unique name)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--aggregate", metavar="A", help="every host of aggregate A (id or name)")
    which.add_argument(
        "--host", action="append", metavar="H", help="this host (repeatable)", dest="hosts"
    )
    which.add_argument("--all", action="store_true", help="every registered node")
    p.add_argument("--watch", action="store_true", help="show a live table until done")
    p.add_argument(
        "--no-wait", action="store_true", help="print the pre-cache as started and return"
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S", help="give up after S seconds"
    )
    compute_api.add_api_options(p)  # an admin token is needed
    from cowfleet.cli.image import _endpoint_opts

    _endpoint_opts(p)  # only to look an image name up


def _image_id(args: argparse.Namespace, cfg: Config) -> str:
    from cowfleet.cache.layout import canonical_image_id, is_image_id

    if is_image_id(args.image):
        return canonical_image_id(args.image)
    from cowfleet.images.client import ImageClient

    with ImageClient.from_config(cfg) as client:
        return str(client.find(args.image).id)


def rows_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``--output json`` list: one object per node."""
    return [{k: n.get(k) for k in JSON_FIELDS} for n in doc.get("nodes", [])]


def _table_rows(doc: dict[str, Any]) -> list[list[str]]:
    out = []
    for n in doc.get("nodes", []):
        total = n.get("bytes_total")
        done = int(n.get("bytes_done") or 0)
        pct = f"{100 * done // total}%" if total else "-"
        rate = f"{human_bytes(int(n.get('rate') or 0))}/s" if n.get("rate") else "-"
        sizes = f"{human_bytes(done)} / {human_bytes(total) if total else '?'}"
        out.append(
            [n["host"], n["state"], pct, sizes, rate, n.get("source") or "-", n.get("error") or ""]
        )
    return out


HEADERS = ["Host", "State", "Done", "Bytes", "Rate", "Source", "Error"]


def _rich_table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    counts = doc.get("counts", {})
    line = ", ".join(f"{counts[s]} {s}" for s in pc.STATES if counts.get(s))
    table = Table(title=f"pre-cache {doc['id']} of image {doc['image_id']}: {line}")
    for h in HEADERS:
        table.add_column(h)
    for r in _table_rows(doc):
        table.add_row(*r)
    return table


def follow(
    api: ComputeClient,
    doc: dict[str, Any],
    *,
    timeout: float,
    on_update: Callable[[dict[str, Any]], None] = lambda _d: None,
    interval: float = 0.5,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the progress resource until no node is active; the last document."""
    deadline = monotonic() + timeout
    while doc.get("state") == pc.RUNNING:
        if monotonic() > deadline:
            raise TimeoutError_(f"pre-cache {doc['id']} still running after {timeout:g}s")
        sleep(interval)
        doc = api.precache(doc["id"])
        on_update(doc)
    return doc


def _precache(args: argparse.Namespace, cfg: Config) -> int:
    if not compute_api.configured(cfg):
        raise UsageError("no compute API: give --api-url or set COWFLEET_API_URL")
    with compute_api.client(cfg) as api:
        body: dict[str, Any] = {"image_id": _image_id(args, cfg)}
        if args.aggregate is not None:
            body["aggregate"] = args.aggregate
        elif args.hosts:
            body["hosts"] = args.hosts
        else:
            body["all"] = True
        doc = api.start_precache(body)
        if not args.no_wait:
            if args.watch:
                from rich.console import Console
                from rich.live import Live

                console = Console(file=sys.stderr if args.output == "json" else sys.stdout)
                with Live(_rich_table(doc), console=console, refresh_per_second=4) as live:
                    doc = follow(
                        api,
                        doc,
                        timeout=args.timeout,
                        on_update=lambda d: live.update(_rich_table(d)),
                    )
            else:
                doc = follow(api, doc, timeout=args.timeout)
    if args.output == "json":
        print_json(rows_of(doc))
    elif not args.watch or args.no_wait:
        print(f"pre-cache {doc['id']} of image {doc['image_id']}: {doc['state']}")
        print_table(HEADERS, _table_rows(doc))
    return FAILED_EXIT if doc.get("counts", {}).get(pc.FAILED) else 0
