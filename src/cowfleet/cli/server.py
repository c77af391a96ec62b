"""``cowfleet server ...``: create instances on cached bases and manage them.

``server list`` and ``server disks`` print what ``virsh list --all`` and
``virsh domblklist`` would, for cowfleet's instances (Id is the hypervisor's
domain id while running, ``-`` otherwise; the UUID is in ``--output json``).

With a compute API configured (``api_url``: ``COWFLEET_API_URL``, ``--api-url``),
``create``, ``list``, ``show``, ``delete``, ``start``, ``stop`` and ``reboot`` go
through it instead (:mod:`cowfleet.cli.compute_api`); ``disks`` and ``console``
stay local. Locally, ``create`` runs the node agent's provisioning code
(:class:`cowfleet.compute.provision.Provisioner`), the one path that builds disks.
"""

from __future__ import annotations

import argparse
import sys

from cowfleet.cli import compute_api
from cowfleet.cli.common import (
    add_command,
    add_group,
    add_instances_path,
    add_setting,
    print_json,
    print_table,
)
from cowfleet.compute.manager import ServerManager
from cowfleet.config import Config
from cowfleet.errors import UsageError


def _node_options(p: argparse.ArgumentParser) -> None:
    """Options that pick the node's instances path and hypervisor (config overrides)."""
    add_setting(p, "driver")
    add_instances_path(p)
    add_setting(p, "libvirt_uri")


def _create(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.create(args, cfg)
    if args.max_count not in (None, 1) or args.min_count != 1:
        raise UsageError("--min/--max need the compute API (COWFLEET_API_URL or --api-url)")
    from cowfleet.cache import ImageCache
    from cowfleet.compute.drivers import make_driver
    from cowfleet.compute.provision import Provisioner
    from cowfleet.images.client import ImageClient

    driver = make_driver(cfg.driver, cfg)
    try:
        with ImageClient.from_config(cfg) as client:
            cache = ImageCache(cfg, client)
            prov = Provisioner(cfg, images=client, cache=cache, driver=driver)
            record = prov.create(args.name, args.image, args.flavor, start=not args.no_start)
    finally:
        driver.close()
    if args.output == "json":
        print_json(record.to_dict())
    else:
        print(f"created server {record.name} ({record.uuid}) in {cfg.instances_path / record.uuid}")
    return 0


def _list(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.list_(args, cfg)
    with ServerManager(cfg) as mgr:
        rows = mgr.list_servers()
    if args.output == "json":
        print_json([r.to_dict() for r in rows])
        return 0
    print_table(
        ["Id", "Name", "State", "Image", "Flavor"],
        [["-" if r.id is None else r.id, r.name, r.state, r.image, r.flavor or "-"] for r in rows],
    )
    for r in rows:
        if r.problem:
            print(
                f"cowfleet: warning: {r.name} ({r.uuid}): {r.state}: {r.problem}", file=sys.stderr
            )
    return 0


def _show(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.show(args, cfg)
    with ServerManager(cfg) as mgr:
        detail = mgr.show(args.server)
    if args.output == "json":
        print_json(detail.to_dict())
        return 0
    row, rec = detail.row, detail.record
    fields: list[tuple[str, object]] = [
        ("UUID", row.uuid),
        ("Name", row.name),
        ("Id", "-" if row.id is None else row.id),
        ("State", row.state),
        ("Driver", row.driver or "-"),
        ("Image", f"{row.image_name or '-'} ({row.image_id or '-'})"),
        ("Flavor", row.flavor or "-"),
        ("Folder", detail.folder or "-"),
    ]
    if rec is not None:
        fl = rec.flavor
        fields += [
            ("VCPUs", fl.vcpus),
            ("Memory", f"{fl.ram_mb} MiB"),
            ("Created", rec.created_at),
        ]
        if rec.kernel_base:
            fields.append(("Kernel", rec.kernel_base))
        if rec.ramdisk_base:
            fields.append(("Ramdisk", rec.ramdisk_base))
        if rec.os_command_line:
            fields.append(("Command line", rec.os_command_line))
        for d in rec.disks:
            fields.append((f"Disk {d.target}", f"{d.file} -> {d.backing} ({d.backing_format})"))
    if row.problem:
        fields.append(("Problem", row.problem))
    for note in detail.base_notes:
        fields.append(("Base", note))
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0


def _disks(args: argparse.Namespace, cfg: Config) -> int:
    with ServerManager(cfg) as mgr:
        disks = mgr.disks(args.server)
    if args.output == "json":
        print_json([{"target": d.target, "source": d.source} for d in disks])
        return 0
    print_table(["Target", "Source"], [[d.target, d.source] for d in disks])
    return 0


def _start(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.start(args, cfg)
    with ServerManager(cfg) as mgr:
        row = mgr.start(args.server)
    return _print_row(args, row.to_dict(), f"server {row.name} started")


def _stop(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.stop(args, cfg)
    with ServerManager(cfg) as mgr:
        row = mgr.stop(args.server, force=args.force, timeout=args.timeout)
    return _print_row(args, row.to_dict(), f"server {row.name} stopped ({row.state})")


def _delete(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.delete(args, cfg)
    with ServerManager(cfg) as mgr:
        row = mgr.delete(args.server)
    return _print_row(args, row.to_dict(), f"server {row.name} ({row.uuid}) deleted")


def _reboot(args: argparse.Namespace, cfg: Config) -> int:
    if compute_api.configured(cfg):
        return compute_api.reboot(args, cfg)
    raise UsageError("server reboot needs the compute API (COWFLEET_API_URL or --api-url)")


def _wait_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--wait`` and ``--wait-timeout`` (compute API only: local commands finish at once)."""
    p.add_argument("--wait", action="store_true", help=f"wait until {what} (compute API)")
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=compute_api.DEFAULT_WAIT,
        metavar="S",
        help=f"give up waiting after S seconds (exit 10; default {compute_api.DEFAULT_WAIT:.0f})",
    )


def _print_row(args: argparse.Namespace, data: dict[str, object], text: str) -> int:
    if args.output == "json":
        print_json(data)
    else:
        print(text)
    return 0


def _console(args: argparse.Namespace, cfg: Config) -> int:
    with ServerManager(cfg) as mgr:
        data = mgr.console(args.server)
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ssub = add_group(sub, "server")
    ssub.required = True

    c = add_command(ssub, "create", _create, "create (and boot) a server from an image")
    c.add_argument("--image", required=True, metavar="IMAGE", help="image name or id")
    c.add_argument("--flavor", required=True, metavar="FLAVOR", help="flavor name (m1.tiny ...)")
    _node_options(c)
    add_setting(c, "virt_type")
    add_setting(c, "image_url")
    add_setting(c, "image_token_file")
    c.add_argument("--no-start", action="store_true", help="define the domain, do not start it")
    compute_api.add_api_options(c)
    c.add_argument(
        "--min", dest="min_count", type=int, default=1, metavar="N",
        help="compute API: fail the request unless at least N servers fit (in servers; default 1)",
    )  # fmt: skip
    c.add_argument(
        "--max", dest="max_count", type=int, default=None, metavar="N",
        help="compute API: up to N servers in one request (NAME-1 ... NAME-N; in servers)",
    )  # fmt: skip
    _wait_options(c, "every server is ACTIVE or ERROR (exit 1 if one is ERROR)")
    c.add_argument("name", metavar="NAME", help="server name (1-63 of A-Z a-z 0-9 . _ -)")

    ls = add_command(ssub, "list", _list, "list servers and their states (like virsh list --all)")
    _node_options(ls)
    compute_api.add_api_options(ls)
    ls.add_argument(
        "--all-projects", action="store_true", help="compute API, admin: every project's servers"
    )

    for name, handler, text, api, wait in (
        ("show", _show, "show one server (with the compute API: why its host was chosen)",
         True, ""),
        ("disks", _disks, "disks of a server, as virsh domblklist", False, ""),
        ("start", _start, "start a server", True, "it is ACTIVE"),
        ("delete", _delete, "destroy the domain and remove the instance folder (never a base)",
         True, "it is gone"),
        ("reboot", _reboot, "reboot a server (compute API only)", True, "it is ACTIVE again"),
    ):  # fmt: skip
        sp = add_command(ssub, name, handler, text)
        _node_options(sp)
        if api:
            compute_api.add_api_options(sp)
        if wait:
            _wait_options(sp, wait)
        if name == "reboot":
            sp.add_argument("--hard", action="store_true", help="a HARD reboot (default SOFT)")
        sp.add_argument("server", metavar="NAME|UUID")

    st = add_command(ssub, "stop", _stop, "shut a server down (ACPI, then power off)")
    _node_options(st)
    compute_api.add_api_options(st)
    _wait_options(st, "it is SHUTOFF")
    st.add_argument("--force", action="store_true", help="power off at once")
    st.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="time to wait for the guest before powering off (in seconds; default 60)",
    )
    st.add_argument("server", metavar="NAME|UUID")

    co = add_command(ssub, "console", _console, "print the serial console log", output=False)
    _node_options(co)
    co.add_argument("server", metavar="NAME|UUID")

    from cowfleet.cli import server_image

    server_image.register(ssub)
