"""``cowfleet server image create SERVER --name N [--wait]``: Nova's ``createImage``.

Talks to the compute API through :class:`cowfleet.api.client.ComputeClient` (the
``api_url`` setting: ``--api-url`` or ``COWFLEET_API_URL``; the token ``api_token`` or
``api_token_file``: ``COWFLEET_API_TOKEN`` or ``--api-token-file``): find the server by
id or exact name, ``POST /v2.1/servers/{id}/action {"createImage": ...}`` at microversion
2.45, print the new image's id. Faults map to exit codes as for every compute API
command (docs/exit-codes.md). ``--wait`` follows the image in the image service
(``--image-url``, same token) until it is ``active`` (exit 0) or gone (the snapshot
failed: exit 4); giving up after ``--timeout`` is exit 10.
"""

from __future__ import annotations

import argparse
import sys
import time

from cowfleet.cli import compute_api
from cowfleet.cli.common import add_command, add_setting
from cowfleet.config import Config
from cowfleet.errors import NotFoundError, TimeoutError_, UsageError

WAIT_POLL = 1.0


def wait_active(image_url: str, token: str, image_id: str, timeout: float) -> str:
    """Poll the image until ``active``; NotFoundError when it was deleted (failed)."""
    from cowfleet.images.client import ImageClient

    deadline = time.monotonic() + timeout
    with ImageClient(image_url, token) as client:
        while True:
            try:
                image = client.get(image_id)
            except NotFoundError as exc:
                raise NotFoundError(
                    f"image {image_id} is gone: the snapshot failed (see the node's log)"
                ) from exc
            if image.status == "active":
                return image.status
            if time.monotonic() > deadline:
                raise TimeoutError_(
                    f"image {image_id} is still {image.status} after {timeout:.0f} s",
                    image_id=image_id,
                )
            time.sleep(WAIT_POLL)


def _create(args: argparse.Namespace, cfg: Config) -> int:
    if not compute_api.configured(cfg):
        raise UsageError("no compute API: use --api-url or COWFLEET_API_URL")
    token = compute_api.api_token(cfg)
    meta: dict[str, str] = {}
    for item in args.property or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--property wants KEY=VALUE, not {item!r}")
        meta[key] = value
    if args.wait and not cfg.image_url:  # said before a snapshot is started
        raise UsageError("--wait needs the image service: --image-url (images.url)")
    with compute_api.client(cfg) as api:
        server_id = api.find_server(args.server)["id"]
        image_id = api.create_image(str(server_id), args.name, meta)
    if args.wait:
        wait_active(str(cfg.image_url), token, image_id, args.timeout)
    sys.stdout.write(image_id + "\n")
    return 0


def register(ssub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``server image create`` under the ``server`` group."""
    from cowfleet.cli.common import add_group

    isub = add_group(ssub, "image")
    isub.required = True
    c = add_command(
        isub,
        "create",
        _create,
        "snapshot a server's root disk into a new image (createImage)",
        output=False,
    )
    c.add_argument("--name", required=True, metavar="NAME", help="name of the new image")
    c.add_argument(
        "--property", action="append", metavar="KEY=VALUE", help="image property (repeatable)"
    )
    c.add_argument("--wait", action="store_true", help="wait until the image is active")
    c.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="how long --wait waits (in seconds; default 3600)",
    )
    compute_api.add_api_options(c)
    add_setting(c, "image_url")
    c.add_argument("server", metavar="NAME|UUID")
