"""``cowfleet cache list|fetch|verify``: the node image cache."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cowfleet.cli.common import (
    add_command,
    add_group,
    add_instances_path,
    add_setting,
    print_json,
    print_table,
)
from cowfleet.config import Config
from cowfleet.units import human_bytes

if TYPE_CHECKING:
    from cowfleet.cache.cache import CachedBase, ImageCache
    from cowfleet.images.client import ImageClient

VERIFY_FAILED_EXIT = 7  # same as IntegrityError


def _common(p: argparse.ArgumentParser, *, remote: bool) -> None:
    add_instances_path(p)
    if remote:
        add_setting(p, "image_url")
        add_setting(p, "image_token_file")


def _cache(cfg: Config) -> ImageCache:
    from cowfleet.cache.cache import ImageCache

    def make_client() -> ImageClient:
        from cowfleet.images.client import ImageClient

        return ImageClient.from_config(cfg)

    # The client (and httpx) is imported only when a download is needed.
    return ImageCache(cfg, make_client)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, not {text!r}")
    return value


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _age(ts: float | None, now: float) -> str:
    """``40 s ago``, ``5 min ago``, ``3 h ago``, ``12 d ago`` (``-``: never)."""
    if ts is None:
        return "-"
    age = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if age >= size:
            return f"{int(age // size)} {unit} ago"
    return f"{int(age)} s ago"


# How the first word of an in_use_by source is counted in the short table.
_SOURCE_KINDS = {"disk": "disk", "libvirt": "domain", "process": "process"}


def in_use_summary(sources: Sequence[str]) -> str:
    """``10 disks, 2 domains, pin``: the sources of use counted by kind (``-``: none)."""
    counts: dict[str, int] = {}
    pinned = False
    for source in sources:
        word = source.split(" ", 1)[0]
        if word == "pin":
            pinned = True
            continue
        kind = _SOURCE_KINDS.get(word, word)
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{n} {_plural(kind, n)}" for kind, n in counts.items()]
    return ", ".join([*parts, *(["pin"] if pinned else [])]) or "-"


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + ("es" if word.endswith("s") else "s")


def _kind(kind: str, fmt: str | None) -> str:
    """``raw base`` / ``qcow2 base``: an image base's format goes with its kind (ephemeral
    and swap bases are always raw)."""
    return f"{fmt} {kind}" if kind == "base" and fmt else kind


def _gib(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def cmd_list(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.cache.holders import collect, node_sources
    from cowfleet.cache.layout import Layout
    from cowfleet.cache.listing import list_entries

    layout = Layout(cfg.instances_path)
    holders = collect(node_sources(cfg), layout.base_dir)
    for p in holders.problems:
        print(f"cowfleet: warning: in-use check incomplete: {p.path}: {p.reason}", file=sys.stderr)
    entries = list_entries(layout, holders=holders)
    if args.output == "json":
        print_json(entries)  # every field, the full lists of users
        return 0
    if args.long:
        rows = [
            (
                e.image_id or "-",
                e.image_name or "-",
                e.format or "-",
                e.kind,
                _gib(e.allocated),
                _gib(e.virtual_size),
                "; ".join(e.in_use_by) or "-",
                _when(e.last_used),
                e.state,
                e.name,
            )
            for e in entries
        ]
        headers = ("Image ID", "Name", "Format", "Kind", "Allocated", "Virtual", "In use by")
        print_table((*headers, "Last used", "State", "File"), rows)
        return 0
    # Fits TABLE_WIDTH: uses counted by source, long names cut, ages instead of dates.
    now = time.time()
    print_table(
        ("Image ID", "Name", "Kind", "Allocated", "In use by", "Last used", "State"),
        [
            (
                e.image_id or "-",
                e.image_name or "-",
                _kind(e.kind, e.format),
                _gib(e.allocated),
                in_use_summary(e.in_use_by),
                _age(e.last_used, now),
                e.state,
            )
            for e in entries
        ],
        shrink=1,
    )
    return 0


def cmd_fetch(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.cache.layout import canonical_image_id, is_image_id

    cache = _cache(cfg)
    ref: str = args.image
    image_id = canonical_image_id(ref) if is_image_id(ref) else cache.client.find(ref).id
    start = time.monotonic()
    # The image and the kernel/ramdisk its kernel_id/ramdisk_id name: what an instance needs.
    got = cache.ensure_cached_with_deps(image_id)
    seconds = time.monotonic() - start
    if args.output == "json":
        print_json(
            {
                **_base_json(got.root),
                "kernel": _base_json(got.kernel) if got.kernel else None,
                "ramdisk": _base_json(got.ramdisk) if got.ramdisk else None,
                "seconds": round(seconds, 3),
            }
        )
    else:
        print(f"{_base_line(got.root)}, {seconds:.2f}s)")
        for role, base in (("kernel", got.kernel), ("ramdisk", got.ramdisk)):
            if base is not None:
                print(f"  {role}: {_base_line(base)})")
    return 0


def _base_json(base: CachedBase) -> dict[str, object]:
    return {
        "image_id": base.image_id,
        "path": str(base.path),
        "format": base.format,
        "virtual_size": base.virtual_size,
        "size": base.size,
        "fetched": base.fetched,
    }


def _base_line(base: CachedBase) -> str:
    """``PATH (fetched, FORMAT, SIZE virtual`` (the caller closes the parenthesis)."""
    what = "fetched" if base.fetched else "already cached"
    return f"{base.path} ({what}, {base.format}, {_gib(base.virtual_size)} virtual"


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    cache = _cache(cfg)
    results = cache.verify(args.image)
    if args.output == "json":
        print_json(results)
    else:
        print_table(
            ("Image ID", "File", "Result", "Reason"),
            [
                (r.image_id or "-", r.name, r.state if r.ok else "FAILED", r.failure or "")
                for r in results
            ],
        )
    return 0 if all(r.ok for r in results) else VERIFY_FAILED_EXIT


def cmd_clean(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.cache.clean import clean

    report = clean(cfg, dry_run=args.dry_run, min_age=args.min_age)
    if args.output == "json":
        print_json(report)
        return 0
    if args.long:
        rows = [
            (
                d.image_id or "-",
                d.image_name or "-",
                d.kind,
                _gib(d.allocated),
                "; ".join(d.in_use_by) or "-",
                _when(d.last_used),
                _action(d.action, d.done, report.dry_run),
                d.reason,
                d.name,
            )
            for d in report.decisions
        ]
        headers = ("Image ID", "Name", "Kind", "Allocated", "In use by", "Last used")
        print_table((*headers, "Action", "Why", "File"), rows)
    else:
        # Fits TABLE_WIDTH: the reason already names the uses and the age; long names and
        # reasons are cut (whole in --long and JSON).
        print_table(
            ("Image ID", "Name", "Kind", "Allocated", "Action", "Why"),
            [
                (
                    d.image_id or "-",
                    d.image_name or "-",
                    d.kind,
                    _gib(d.allocated),
                    _action(d.action, d.done, report.dry_run),
                    d.reason,
                )
                for d in report.decisions
            ],
            shrink=(1, 5),
        )
    # Unreadable disks, broken chains and quarantines are also logged (stderr) by the pass.
    print(("dry run: " if report.dry_run else "") + report.summary())
    return 0


def _action(action: str, done: bool, dry_run: bool) -> str:
    if action == "keep":
        return "kept"
    past = {"remove": "removed", "quarantine": "quarantined"}[action]
    return past if done else f"would be {past}" if dry_run else f"not {past}"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    csub = add_group(sub, "cache")
    csub.required = True
    lp = add_command(csub, "list", cmd_list, "list cached bases, partial downloads and users")
    lp.add_argument(
        "--long",
        "-l",
        action="store_true",
        help="every column: format, virtual size, each user's instance folder, the file name "
        "(wide; --output json has the same)",
    )
    _common(lp, remote=False)
    fp = add_command(csub, "fetch", cmd_fetch, "fetch an image into the cache (pre-cache)")
    fp.add_argument("image", metavar="IMAGE", help="image id or unique name")
    _common(fp, remote=True)
    vp = add_command(
        csub, "verify", cmd_verify, "re-hash and re-inspect cached bases (exit 7 when one fails)"
    )
    vp.add_argument("image", metavar="IMAGE", nargs="?", help="image id (default: every base)")
    _common(vp, remote=False)
    cp = add_command(
        csub,
        "clean",
        cmd_clean,
        "one cache manager pass: each file in _base with the action taken and why",
    )
    cp.add_argument(
        "--dry-run", action="store_true", help="decide and report, change nothing (read-only)"
    )
    cp.add_argument(
        "--long",
        "-l",
        action="store_true",
        help="every column: each user, the last use, the whole reason, the file name "
        "(wide; --output json has the same)",
    )
    cp.add_argument(
        "--min-age",
        type=_seconds,
        metavar="SECONDS",
        help="remove unused bases after this many seconds "
        "(in seconds; default: the max_unused_age setting; 0: any)",
    )
    _common(cp, remote=False)
