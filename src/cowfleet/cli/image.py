"""``cowfleet image create|upload|list|show|download|set|delete`` (the image client CLI).

``image precache`` (the compute API's pre-cache) is :mod:`cowfleet.cli.precache`.

IMAGE is an id or a unique name everywhere. The endpoint and token come from the
configuration, ``--image-url`` / ``--token-file`` or ``COWFLEET_IMAGE_URL`` /
``COWFLEET_IMAGE_TOKEN``; no token at all is fine for a Glance without keystone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

from cowfleet.cli.common import add_command, add_group, add_setting, print_json, print_table
from cowfleet.config import Config
from cowfleet.errors import LocalIOError, MissingFileError, UsageError
from cowfleet.images.vocabulary import CONTAINER_FORMATS, DISK_FORMATS, STATUSES, VISIBILITIES

# Imported lazily by handlers' callers in tests: ``client_factory`` can be replaced.
ClientFactory = Callable[[Config], Any]


def _default_factory(cfg: Config) -> Any:
    from cowfleet.images.client import ImageClient

    return ImageClient.from_config(cfg)


client_factory: ClientFactory = _default_factory
PROGRESS_MIN = 64 * 1024 * 1024  # show a bar for transfers this large even off a TTY


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmds = add_group(sub, "image")

    p = add_command(cmds, "create", _create, "create an image record (status queued)")
    _endpoint_opts(p)
    _meta_opts(p, create=True)

    p = add_command(
        cmds, "upload", _upload, "create an image and upload FILE (- for stdin) in one step"
    )
    _endpoint_opts(p)
    _meta_opts(p, create=True)
    p.add_argument("file", metavar="FILE", help="the image data; - reads standard input")

    p = add_command(cmds, "list", _list, "list images")
    _endpoint_opts(p)
    p.add_argument("--name", help="only images with this name")
    p.add_argument("--status", help=f"only images in this status: {_one_of(STATUSES)}")
    p.add_argument("--disk-format", help=f"only images of this format: {_one_of(DISK_FORMATS)}")
    p.add_argument("--visibility", help=f"only images so visible: {_one_of(VISIBILITIES)}")

    p = add_command(cmds, "show", _show, "show one image")
    _endpoint_opts(p)
    p.add_argument("image", metavar="IMAGE", help="image id or unique name")

    p = add_command(cmds, "download", _download, "download an image's data (verified)")
    _endpoint_opts(p)
    p.add_argument("image", metavar="IMAGE", help="image id or unique name")
    p.add_argument(
        "--file",
        type=Path,
        required=True,
        metavar="PATH",
        dest="dest",
        help="where to write the data (a new or regular file; written whole, then renamed)",
    )

    p = add_command(cmds, "set", _set, "change an image's name or properties")
    _endpoint_opts(p)
    p.add_argument("image", metavar="IMAGE", help="image id or unique name")
    p.add_argument("--name", help="new name")
    _size_opts(p)
    p.add_argument("--visibility", help=f"who sees the image: {_one_of(VISIBILITIES)}")
    p.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a free-form property (repeatable)",
    )
    p.add_argument(
        "--remove-property",
        action="append",
        default=[],
        metavar="KEY",
        help="remove a free-form property (repeatable)",
    )

    p = add_command(cmds, "delete", _delete, "delete images", output=False)
    _endpoint_opts(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")

    from cowfleet.cli import image_members

    image_members.register(cmds)

    from cowfleet.cli import precache as precache_cli

    precache_cli.register(cmds)


def _endpoint_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image service")
    add_setting(g, "image_url")
    add_setting(g, "image_token_file", extra="(env COWFLEET_IMAGE_TOKEN: the token itself)")


def _one_of(values: tuple[str, ...]) -> str:
    return "one of " + ", ".join(values)


def _size_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-disk",
        type=int,
        metavar="GIB",
        help="smallest root disk the image boots from (in GiB; Glance's min_disk)",
    )
    p.add_argument(
        "--min-ram",
        type=int,
        metavar="MIB",
        help="least memory the image boots with (in MiB; Glance's min_ram)",
    )


def _meta_opts(p: argparse.ArgumentParser, *, create: bool) -> None:
    p.add_argument("--name", required=create, help="image name")
    p.add_argument(
        "--disk-format",
        required=create,
        help=f"the image data's format: {_one_of(DISK_FORMATS)}",
    )
    p.add_argument(
        "--container-format",
        default="bare",
        help=f"container format: {_one_of(CONTAINER_FORMATS)} (default bare)",
    )
    p.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a free-form property (repeatable)",
    )
    _size_opts(p)
    p.add_argument("--visibility", help=f"who sees the image: {_one_of(VISIBILITIES)}")


def _properties(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--property needs KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def _create_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": args.name,
        "disk_format": args.disk_format,
        "container_format": args.container_format,
        "min_disk": args.min_disk,
        "min_ram": args.min_ram,
        "visibility": args.visibility,
    }
    fields.update(_properties(args.property))
    return fields


# -- rendering ---------------------------------------------------------------------
def _render(args: argparse.Namespace, image: Any) -> None:
    if args.output == "json":
        print_json(image.to_dict())
        return
    rows: list[tuple[str, Any]] = [(k, v) for k, v in image.to_dict().items() if k != "properties"]
    if image.properties:
        props = ", ".join(f"{k}='{v}'" for k, v in sorted(image.properties.items()))
        rows.append(("properties", props))
    rows.sort(key=lambda r: r[0])
    print_table(["Field", "Value"], [(k, "" if v is None else v) for k, v in rows])


@contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[int, int | None], None] | None]:
    if not (sys.stderr.isatty() or (total or 0) >= PROGRESS_MIN):
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=total)

        def update(done: int, tot: int | None) -> None:
            bar.update(task, completed=done, total=tot)

        yield update


# -- handlers ----------------------------------------------------------------------
def _create(args: argparse.Namespace, cfg: Config) -> int:
    with client_factory(cfg) as client:
        _render(args, client.create(**_create_fields(args)))
    return 0


def _upload(args: argparse.Namespace, cfg: Config) -> int:
    data: IO[bytes]
    if args.file == "-":
        # A pipe has no length: the client sends it chunked. A file redirected to
        # stdin is regular: its length is known and it can be rewound.
        from cowfleet.images.body import remaining_size

        data, label = sys.stdin.buffer, "stdin"
        size = remaining_size(data)
        closing: AbstractContextManager[Any] = nullcontext()
    else:
        path = Path(args.file)
        try:
            data = path.open("rb")
        except FileNotFoundError as exc:
            raise MissingFileError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
        except OSError as exc:
            raise LocalIOError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
        label, size = path.name, (path.stat().st_size if path.is_file() else None)
        closing = data
    with closing, client_factory(cfg) as client:
        image = client.create(**_create_fields(args))
        with _progress(f"upload {label}", size) as progress:
            image = client.upload(image.id, data, size=size, progress=progress)
        _render(args, image)
    return 0


def _list(args: argparse.Namespace, cfg: Config) -> int:
    filters = {
        "name": args.name,
        "status": args.status,
        "disk_format": args.disk_format,
        "visibility": args.visibility,
    }
    with client_factory(cfg) as client:
        images = list(client.list(**{k: v for k, v in filters.items() if v is not None}))
    if args.output == "json":
        print_json([i.to_dict() for i in images])
    else:
        print_table(
            ["ID", "Name", "Status", "Disk Format", "Size"],
            [(i.id, i.name, i.status, i.disk_format, i.size) for i in images],
        )
    return 0


def _show(args: argparse.Namespace, cfg: Config) -> int:
    with client_factory(cfg) as client:
        _render(args, client.find(args.image))
    return 0


def _download(args: argparse.Namespace, cfg: Config) -> int:
    from cowfleet.fetch.tofile import check_destination

    check_destination(args.dest)  # a folder or unwritable place fails before any fetch
    with client_factory(cfg) as client:
        image = client.find(args.image)
        with _progress(f"download {image.name or image.id}", image.size) as progress:
            image = client.download(image.id, args.dest, progress=progress)
    if args.output == "json":
        print_json({"image": image.to_dict(), "file": str(args.dest)})
    else:
        print(f"{args.dest}: {image.size} bytes, {image.os_hash_algo or 'md5'} verified")
    return 0


def _set(args: argparse.Namespace, cfg: Config) -> int:
    changes: dict[str, str | int | None] = {}
    for key in ("name", "min_disk", "min_ram", "visibility"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    changes.update(_properties(args.property))
    for key in args.remove_property:
        changes[key] = None
    if not changes:
        raise UsageError("nothing to change: give --name, --property or --remove-property")
    with client_factory(cfg) as client:
        image = client.find(args.image)
        _render(args, client.update(image.id, changes))
    return 0


def _delete(args: argparse.Namespace, cfg: Config) -> int:
    with client_factory(cfg) as client:
        for ref in args.images:
            client.delete(client.find(ref).id)
    return 0
