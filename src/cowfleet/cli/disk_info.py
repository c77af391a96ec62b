"""``cowfleet disk info`` and ``cowfleet disk overlay`` (no qemu-img needed)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from cowfleet.cli.common import add_command, print_json
from cowfleet.config import Config
from cowfleet.errors import UsageError
from cowfleet.formats import info as info_mod
from cowfleet.formats.overlay import DEFAULT_CLUSTER_SIZE, create_overlay

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """Bytes from ``text`` as qemu-img reads sizes: ``1073741824``, ``512M``, ``1.5G``, ``20g``.

    Suffixes are powers of 1024 (K, M, G, T, P, E); ``b`` means bytes.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r}: expected bytes or a number with K/M/G/T")
    number: str = m.group(1)
    suffix: str = m.group(2).lower()
    shift = _SUFFIX[suffix]
    if "." in number:
        if not shift:
            raise UsageError(f"invalid size {text!r}: fractional bytes")
        whole, frac = number.split(".")
        value = (int(whole) << shift) + (int(frac) << shift) // int(10 ** len(frac))
    else:
        value = int(number) << shift
    return value


def _info(args: argparse.Namespace, cfg: Config) -> int:
    if args.backing_chain:
        layers = info_mod.backing_chain(args.path)
        if args.output == "json":
            print_json([layer.to_qemu_json() for layer in layers])
        else:
            print("\n".join(layer.render() for layer in layers), end="")
        return 0
    disk = info_mod.disk_info(args.path)
    if args.output == "json":
        print_json(disk.to_qemu_json())
    else:
        print(disk.render(), end="")
    return 0


def _overlay(args: argparse.Namespace, cfg: Config) -> int:
    # Overlays always record an absolute backing path; a relative one is taken from CWD.
    backing = Path(os.path.abspath(args.backing))
    result = create_overlay(
        Path(args.out),
        backing,
        args.backing_format,
        size=args.size,
        cluster_size=args.cluster_size,
        lazy_refcounts=args.lazy_refcounts,
        max_virtual_size=cfg.max_virtual_size,
    )
    if args.output == "json":
        print_json(result)
    else:
        print(
            f"Formatting '{result.path}', fmt=qcow2 cluster_size={result.cluster_size} "
            f"extended_l2=off compression_type=zlib size={result.virtual_size} "
            f"backing_file={result.backing} backing_fmt={result.backing_format} "
            f"lazy_refcounts={'on' if args.lazy_refcounts else 'off'} refcount_bits=16"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``info`` and ``overlay`` to the ``disk`` group."""
    p = add_command(sub, "info", _info, "show a disk image like qemu-img info (no qemu-img needed)")
    p.add_argument(
        "--backing-chain",
        action="store_true",
        help="describe every layer, top to bottom (recorded backing formats, never probed)",
    )
    p.add_argument("path", metavar="PATH", help="the image file")

    p = add_command(
        sub,
        "overlay",
        _overlay,
        "create a qcow2 overlay on a backing file (like qemu-img create -f qcow2 -b -F)",
    )
    p.add_argument("--backing", required=True, metavar="BASE", help="backing file")
    p.add_argument(
        "--backing-format",
        required=True,
        metavar="FMT",
        help="backing file format to pin: one of raw, qcow2, vmdk, vpc (vhd), vhdx, vdi",
    )
    p.add_argument(
        "--size",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="virtual size in bytes or with K/M/G/T (default: the backing file's)",
    )
    p.add_argument(
        "--cluster-size",
        type=_size_arg,
        default=DEFAULT_CLUSTER_SIZE,
        metavar="N",
        help="cluster size in bytes or with K/M, a power of two from 512 bytes to 2M (default 64K)",
    )
    p.add_argument("--lazy-refcounts", action="store_true", help="set the lazy refcounts bit")
    p.add_argument("out", metavar="OUT", help="the overlay file to write")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
