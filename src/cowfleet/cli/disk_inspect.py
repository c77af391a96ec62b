"""``cowfleet disk inspect``: judge an image file against its declared format.

Exit codes: 0 safe; 3 unsafe (each failure named); 2 usage or I/O errors.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from cowfleet.cli.common import add_command, print_json
from cowfleet.config import Config
from cowfleet.errors import UnsafeImageError
from cowfleet.formats.inspection import GLANCE_DISK_FORMATS, Inspection
from cowfleet.formats.inspector import inspect_path
from cowfleet.formats.policy import Verdict, check

EXIT_SAFE = 0
EXIT_UNSAFE = UnsafeImageError.exit_code  # 3


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``inspect`` to the ``disk`` group."""
    p = add_command(
        sub,
        "inspect",
        _inspect,
        "check that an image file is safe to use as its declared format "
        "(exit 0 safe, 3 unsafe, 2 usage or I/O error)",
    )
    p.add_argument(
        "--declared-format",
        required=True,
        choices=sorted(GLANCE_DISK_FORMATS),
        metavar="FMT",
        help=f"the Glance disk_format the image claims: {', '.join(sorted(GLANCE_DISK_FORMATS))}",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="image file to inspect")


def verdict_json(path: Path, insp: Inspection, verdict: Verdict) -> dict[str, Any]:
    """The machine-readable verdict (``--output json``)."""
    out: dict[str, Any] = {
        "filename": str(path),
        "declared_format": verdict.declared_format,
        "format": insp.format,
        "virtual_size": insp.virtual_size,
        "data_size": insp.data_size,
        "matches": list(insp.matches),
        "partition_table": insp.partition_table,
        "cluster_size": insp.cluster_size,
        "backing_file": insp.backing_file,
        "encryption": insp.encryption if insp.encrypted else None,
        "complete": insp.complete,
        "safe": verdict.safe,
        "failures": [{"code": f.code, "message": f.message} for f in verdict.failures],
    }
    h = insp.qcow2
    if h is not None:
        out["qcow2"] = {
            "version": h.version,
            "compat": h.compat,
            "cluster_size": h.cluster_size,
            "backing_file": h.backing_file,
            "backing_format": h.backing_format,
            "data_file": h.data_file,
            "dirty": h.dirty,
            "corrupt": h.corrupt,
            "lazy_refcounts": h.lazy_refcounts,
            "refcount_bits": h.refcount_bits,
            "extended_l2": h.extended_l2,
            "compression_type": h.compression_type,
            "encryption": h.encryption,
            "l1_size": h.l1_size,
            "l1_table_offset": h.l1_table_offset,
            "refcount_table_offset": h.refcount_table_offset,
            "refcount_table_clusters": h.refcount_table_clusters,
            "nb_snapshots": h.nb_snapshots,
            "incompatible_features": h.incompatible_features,
        }
    if insp.vmdk is not None:
        out["vmdk"] = {
            "create_type": insp.vmdk.create_type,
            "extents": list(insp.vmdk.extents),
            "sparse_header": insp.vmdk.sparse_header,
        }
    return out


def _with_tables(path: Path, verdict: Verdict) -> Verdict:
    """Add the on-disk check of a qcow2's table entries, as the service and cache run it."""
    from cowfleet.formats.qcow2_tables import check_file

    try:
        check_file(path)
    except UnsafeImageError as exc:
        return dataclasses.replace(verdict, failures=verdict.failures + exc.failures)
    return verdict


def _inspect(args: argparse.Namespace, cfg: Config) -> int:
    path: Path = args.path
    insp = inspect_path(path, strict=False)  # a file the user names
    verdict = check(args.declared_format, insp, max_virtual_size=cfg.max_virtual_size)
    if verdict.safe and insp.format == "qcow2":
        verdict = _with_tables(path, verdict)
    if args.output == "json":
        print_json(verdict_json(path, insp, verdict))
    else:
        state = "safe" if verdict.safe else "UNSAFE"
        print(
            f"{path}: {state}: declared {verdict.declared_format}, detected {insp.format}, "
            f"virtual size {insp.virtual_size} bytes"
        )
        for f in verdict.failures:
            print(f"  {f.code}: {f.message}")
    return EXIT_SAFE if verdict.safe else EXIT_UNSAFE
