"""``cowfleet server image create SERVER --name N [--wait]``: Nova's ``createImage``.

Talks to the compute API (``--api-url`` or ``COWFLEET_API_URL``; token from
``--api-token-file`` or ``COWFLEET_API_TOKEN``) with a few plain httpx calls: find
the server by id or exact name, ``POST /v2.1/servers/{id}/action {"createImage": ...}``
at microversion 2.45, print the new image's id. ``--wait`` follows the image in the
image service (``--image-url``, same token) until it is ``active`` (exit 0) or gone
(the snapshot failed: exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from cowfleet.cli.common import add_command, add_setting
from cowfleet.config import Config
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    NotFoundError,
    UsageError,
    ValidationError,
)

MICROVERSION = "2.45"
WAIT_POLL = 1.0


def _token(args: argparse.Namespace) -> str:
    if args.api_token_file:
        from cowfleet.images.token_file import read_token_file

        try:
            return read_token_file(Path(args.api_token_file), allow_insecure=False)
        except FileNotFoundError as exc:
            raise UsageError(f"token file not found: {args.api_token_file}") from exc
    token = os.environ.get("COWFLEET_API_TOKEN", "")
    if not token:
        raise UsageError("no compute API token: use --api-token-file or COWFLEET_API_TOKEN")
    return token


def _fault(resp: Any, what: str) -> Exception:
    try:
        doc = resp.json()
        inner = next(iter(doc.values())) if isinstance(doc, dict) and doc else {}
        msg = inner.get("message") if isinstance(inner, dict) else None
    except (ValueError, StopIteration, AttributeError):
        msg = None
    text = f"{what}: {msg or f'HTTP {resp.status_code}'}"
    if resp.status_code == 404:
        return NotFoundError(text)
    if resp.status_code == 409:
        return ConflictError(text)
    if resp.status_code in (400, 413):
        return ValidationError(text)
    if resp.status_code in (401, 403):
        return UsageError(text)
    return BackendUnavailableError(text)


def _find_server(http: Any, ref: str) -> str:
    resp = http.get(f"/servers/{ref}")
    if resp.status_code == 200:
        return str(resp.json()["server"]["id"])
    resp = http.get("/servers", params={"name": ref})
    if resp.status_code != 200:
        raise _fault(resp, f"server {ref}")
    found = [s["id"] for s in resp.json().get("servers", []) if s.get("name") == ref]
    if not found:
        raise NotFoundError(f"no server named {ref!r}")
    if len(found) > 1:
        raise ConflictError(f"{len(found)} servers are named {ref!r}: use the id")
    return str(found[0])


def create_image(api_url: str, token: str, server: str, name: str, metadata: dict[str, str]) -> str:
    """The new image's id (``createImage`` at microversion 2.45)."""
    import httpx

    base = api_url.rstrip("/")
    if not base.endswith("/v2.1"):
        base += "/v2.1"
    headers = {
        "X-Auth-Token": token,
        "OpenStack-API-Version": f"compute {MICROVERSION}",
        "X-OpenStack-Nova-API-Version": MICROVERSION,
    }
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60.0) as http:
            server_id = _find_server(http, server)
            body: dict[str, Any] = {"createImage": {"name": name}}
            if metadata:
                body["createImage"]["metadata"] = metadata
            resp = http.post(f"/servers/{server_id}/action", json=body)
            if resp.status_code != 202:
                raise _fault(resp, f"snapshot of server {server}")
            return str(resp.json()["image_id"])
    except httpx.HTTPError as exc:
        raise BackendUnavailableError(
            f"the compute API at {base} cannot be reached: {exc}"
        ) from exc


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
                raise BackendUnavailableError(
                    f"image {image_id} is still {image.status} after {timeout:.0f} s"
                )
            time.sleep(WAIT_POLL)


def _create(args: argparse.Namespace, cfg: Config) -> int:
    api_url = args.api_url or os.environ.get("COWFLEET_API_URL", "")
    if not api_url:
        raise UsageError("no compute API: use --api-url or COWFLEET_API_URL")
    token = _token(args)
    meta: dict[str, str] = {}
    for item in args.property or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--property wants KEY=VALUE, not {item!r}")
        meta[key] = value
    image_id = create_image(api_url, token, args.server, args.name, meta)
    if args.wait:
        if not cfg.image_url:
            raise UsageError("--wait needs the image service: --image-url (images.url)")
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
    c.add_argument("--api-url", metavar="URL", help="the compute API (or COWFLEET_API_URL)")
    c.add_argument("--api-token-file", metavar="FILE", help="token file (or COWFLEET_API_TOKEN)")
    add_setting(c, "image_url")
    c.add_argument("server", metavar="NAME|UUID")
