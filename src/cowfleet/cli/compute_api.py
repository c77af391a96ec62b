"""``server``, ``flavor`` and ``hypervisor`` commands through the compute API.

Used when a compute API is configured (``api_url``: ``COWFLEET_API_URL``, ``--api-url``
or ``[client] api_url``); without one, ``server`` and ``flavor`` work on this node
(:mod:`cowfleet.cli.server`). Errors are the API's own messages, mapped to exit codes
by :mod:`cowfleet.api.client`.
"""

from __future__ import annotations

import argparse
import sys
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import Any

from cowfleet.api.client import PLACEMENT_KEY, SETTLED, ComputeClient
from cowfleet.cli.common import add_setting, print_json, print_table
from cowfleet.config import Config
from cowfleet.errors import CowfleetError, UsageError

DEFAULT_WAIT = 600.0  # seconds --wait waits for a server before giving up (exit 10)


def add_api_options(p: argparse.ArgumentParser) -> None:
    """``--api-url`` and ``--api-token-file`` (the ``api_url``/``api_token_file`` settings)."""
    add_setting(p, "api_url")
    add_setting(p, "api_token_file")


def configured(cfg: Config) -> bool:
    return bool(cfg.api_url)


def api_token(cfg: Config) -> str:
    """The token: ``api_token``, else the token file's text (mode 0600 required)."""
    if cfg.api_token:
        return cfg.api_token
    if cfg.api_token_file is None:
        raise UsageError(
            "no token for the compute API: set COWFLEET_API_TOKEN or a token file "
            "(--api-token-file, COWFLEET_API_TOKEN_FILE, [client] api_token_file)"
        )
    from cowfleet.images.token_file import read_token_file

    try:
        return read_token_file(
            cfg.api_token_file, allow_insecure=cfg.images_allow_insecure_token_file
        )
    except FileNotFoundError:
        raise UsageError(f"compute API token file {cfg.api_token_file} does not exist") from None


def client(cfg: Config) -> ComputeClient:
    assert cfg.api_url is not None
    return ComputeClient(cfg.api_url, api_token(cfg))


def _is_uuid(value: str) -> bool:
    try:
        uuidlib.UUID(value)
    except ValueError:
        return False
    return True


def image_id(cfg: Config, name_or_id: str) -> str:
    """An image id as is; a name looked up in the image service with the API's token."""
    if _is_uuid(name_or_id):
        return name_or_id  # an unknown id is the API's 400
    from cowfleet.images.client import ImageClient

    with ImageClient(cfg.endpoint, api_token(cfg)) as images:
        return images.find(name_or_id).id


def image_names(cfg: Config) -> dict[str, str]:
    """Image id -> name, for tables; empty when the image service cannot tell."""
    from cowfleet.images.client import ImageClient

    try:
        with ImageClient(cfg.endpoint, api_token(cfg), timeout=5.0) as images:
            return {i.id: i.name or i.id for i in images.list()}
    except CowfleetError:
        return {}


# -- rendering --------------------------------------------------------------------------
def _flavor_name(server: Mapping[str, Any]) -> str:
    flavor = server.get("flavor") or {}
    return str(flavor.get("original_name") or flavor.get("id") or "-")


def _image_of(server: Mapping[str, Any], names: Mapping[str, str]) -> str:
    image = server.get("image") or {}
    ident = str(image.get("id") or "") if isinstance(image, dict) else ""
    return names.get(ident, ident or "-")


def server_rows(servers: list[dict[str, Any]], names: Mapping[str, str]) -> list[list[str]]:
    return [
        [
            s["id"],
            s["name"],
            s["status"],
            s.get("OS-EXT-SRV-ATTR:host") or "-",
            _image_of(s, names),
            _flavor_name(s),
        ]
        for s in servers
    ]


SERVER_HEADERS = ["ID", "Name", "Status", "Host", "Image", "Flavor"]


def print_servers(servers: list[dict[str, Any]], names: Mapping[str, str]) -> None:
    print_table(SERVER_HEADERS, server_rows(servers, names), shrink=1)


def placement_lines(placement: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Why the host was chosen, as (field, text) lines for ``server show``."""
    if not placement:
        return []
    weights = placement.get("weights") or {}
    shown = ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(weights.items())) or "-"
    lines = [
        (
            "Placement",
            f"{placement.get('host')} (attempt {placement.get('attempt')}, "
            f"weight {float(placement.get('weight') or 0):.3f})",
        ),
        ("Weights", shown),
        (
            "Filters",
            f"{placement.get('hosts_passed')} of {placement.get('hosts_considered')} hosts "
            f"passed {', '.join(str(f) for f in placement.get('filters') or ()) or '-'}",
        ),
        ("Image cached", "yes" if placement.get("image_on_host") else "no"),
    ]
    return lines


def print_fields(fields: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k + ':':<{width + 1}} {v}")


def _settled(server: dict[str, Any] | None) -> bool:
    return server is None or server["status"] in SETTLED


# -- server commands -------------------------------------------------------------------------
def create(args: argparse.Namespace, cfg: Config) -> int:
    lo, hi = args.min_count, args.max_count
    if hi is None:
        hi = max(lo, 1)
    if lo > hi:
        raise UsageError(f"--min {lo} is more than --max {hi}")
    with client(cfg) as api:
        flavor = api.find_flavor(args.flavor)
        flavor_ref = str(flavor["id"]) if flavor is not None else args.flavor  # API: 400
        result = api.create_servers(
            args.name, image_id(cfg, args.image), flavor_ref, min_count=lo, max_count=hi
        )
        servers = api.created(result)
        if args.wait:
            servers = [api.wait(s["id"], _settled, timeout=args.wait_timeout) or s for s in servers]
    if args.output == "json":
        print_json(servers)
    else:
        print_servers(servers, image_names(cfg))
    failed = [s for s in servers if s["status"] == "ERROR"]
    if args.wait and failed:
        for s in failed:
            fault = (s.get("fault") or {}).get("message", "no fault recorded")
            print(f"cowfleet: error: server {s['name']} ({s['id']}): {fault}", file=sys.stderr)
        return CowfleetError.exit_code
    return 0


def list_(args: argparse.Namespace, cfg: Config) -> int:
    with client(cfg) as api:
        servers = api.servers(all_projects=args.all_projects)
    if args.output == "json":
        print_json(servers)
        return 0
    print_servers(servers, image_names(cfg))
    return 0


def show(args: argparse.Namespace, cfg: Config) -> int:
    with client(cfg) as api:
        s = api.find_server(args.server, all_projects=True)
    if args.output == "json":
        print_json(s)
        return 0
    names = image_names(cfg)
    fields: list[tuple[str, object]] = [
        ("ID", s["id"]),
        ("Name", s["name"]),
        ("Status", s["status"]),
        ("Task", s.get("OS-EXT-STS:task_state") or "-"),
        ("Host", s.get("OS-EXT-SRV-ATTR:host") or "-"),
        ("Host status", s.get("host_status") or "-"),
        ("Image", _image_of(s, names)),
        ("Flavor", _flavor_name(s)),
        ("Project", s.get("tenant_id") or "-"),
        ("Created", s.get("created") or "-"),
    ]
    fields += placement_lines(s.get(PLACEMENT_KEY))
    if s.get("fault"):
        fields.append(("Fault", s["fault"].get("message", "")))
    print_fields(fields)
    return 0


def _act(
    args: argparse.Namespace,
    cfg: Config,
    verb: str,
    send: Callable[[ComputeClient, str], None],
    done: Callable[[dict[str, Any] | None], bool],
) -> int:
    with client(cfg) as api:
        s = api.find_server(args.server, all_projects=True)
        send(api, s["id"])
        last: dict[str, Any] | None = s
        if getattr(args, "wait", False):
            last = api.wait(s["id"], done, timeout=args.wait_timeout)
    if args.output == "json":
        print_json(
            last if last is not None else {"id": s["id"], "name": s["name"], "deleted": True}
        )
    else:
        print(f"server {s['name']} ({s['id']}): {verb}")
    return 0


def delete(args: argparse.Namespace, cfg: Config) -> int:
    return _act(
        args, cfg, "deleted" if args.wait else "delete requested",
        lambda api, sid: api.delete_server(sid), lambda v: v is None,
    )  # fmt: skip


def _steady(status: str) -> Callable[[dict[str, Any] | None], bool]:
    def done(v: dict[str, Any] | None) -> bool:
        return v is None or (v["status"] in (status, "ERROR") and not v["OS-EXT-STS:task_state"])

    return done


def start(args: argparse.Namespace, cfg: Config) -> int:
    return _act(
        args, cfg, "started" if args.wait else "start requested",
        lambda api, sid: api.action(sid, {"os-start": None}), _steady("ACTIVE"),
    )  # fmt: skip


def stop(args: argparse.Namespace, cfg: Config) -> int:
    return _act(
        args, cfg, "stopped" if args.wait else "stop requested",
        lambda api, sid: api.action(sid, {"os-stop": None}), _steady("SHUTOFF"),
    )  # fmt: skip


def reboot(args: argparse.Namespace, cfg: Config) -> int:
    kind = "HARD" if args.hard else "SOFT"
    return _act(
        args, cfg, f"rebooted ({kind})" if args.wait else f"reboot ({kind}) requested",
        lambda api, sid: api.action(sid, {"reboot": {"type": kind}}), _steady("ACTIVE"),
    )  # fmt: skip


# -- flavors and hypervisors ----------------------------------------------------------------
FLAVOR_HEADERS = ["ID", "Name", "VCPUs", "RAM MiB", "Root GiB", "Ephemeral GiB", "Swap MiB"]


def _flavor_row(f: Mapping[str, Any]) -> list[object]:
    return [
        f["id"], f["name"], f["vcpus"], f["ram"], f["disk"],
        f.get("OS-FLV-EXT-DATA:ephemeral", 0), f.get("swap") or 0,
    ]  # fmt: skip


def flavor_list(args: argparse.Namespace, cfg: Config) -> int:
    with client(cfg) as api:
        flavors = api.flavors()
    if args.output == "json":
        print_json(flavors)
    else:
        print_table(FLAVOR_HEADERS, [_flavor_row(f) for f in flavors])
    return 0


def flavor_show(args: argparse.Namespace, cfg: Config) -> int:
    with client(cfg) as api:
        f = api.find_flavor(args.flavor)
    if f is None:
        from cowfleet.errors import NotFoundError

        raise NotFoundError(f"no flavor with id or name {args.flavor!r}", flavor=args.flavor)
    if args.output == "json":
        print_json(f)
    else:
        print_fields(list(zip(FLAVOR_HEADERS, _flavor_row(f), strict=True)))
    return 0


def flavor_create(args: argparse.Namespace, cfg: Config) -> int:
    with client(cfg) as api:
        f = api.create_flavor(
            args.name,
            vcpus=args.vcpus,
            ram_mb=args.ram,
            disk_gb=args.disk,
            ephemeral_gb=args.ephemeral,
            swap_mb=args.swap,
            flavor_id=args.id,
        )
    if args.output == "json":
        print_json(f)
    else:
        print(f"created flavor {f['name']} (id {f['id']})")
    return 0


def flavor_delete(args: argparse.Namespace, cfg: Config) -> int:
    with client(cfg) as api:
        f = api.find_flavor(args.flavor)
        flavor_id = str(f["id"]) if f is not None else args.flavor  # the API's 404
        api.delete_flavor(flavor_id)
    if args.output == "json":
        print_json({"id": flavor_id, "deleted": True})
    else:
        print(f"deleted flavor {args.flavor} (id {flavor_id})")
    return 0


HYPERVISOR_HEADERS = ["Hostname", "Type", "Host IP", "State", "vCPUs", "RAM MiB", "Disk GiB",
                      "Servers", "Cached images"]  # fmt: skip


def hypervisor_list(args: argparse.Namespace, cfg: Config) -> int:
    if not configured(cfg):
        raise UsageError("hypervisor list needs the compute API: set COWFLEET_API_URL or --api-url")
    with client(cfg) as api:
        hvs = api.hypervisors()
    if args.output == "json":
        print_json(hvs)
        return 0
    print_table(
        HYPERVISOR_HEADERS,
        [
            [
                h["hypervisor_hostname"],
                h.get("hypervisor_type", "-"),
                h.get("host_ip", "-"),
                h.get("state", "-"),
                f"{h.get('vcpus_used', 0)}/{h.get('vcpus', 0)}",
                f"{h.get('memory_mb_used', 0)}/{h.get('memory_mb', 0)}",
                f"{h.get('local_gb_used', 0)}/{h.get('local_gb', 0)}",
                h.get("running_vms", 0),
                len(h.get("cowfleet:cache") or ()),
            ]
            for h in hvs
        ],
    )
    return 0
