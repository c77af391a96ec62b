"""JSON shapes of servers, flavors, hypervisors and aggregates, by microversion."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cowfleet.api import states
from cowfleet.api.context import Ctx
from cowfleet.api.db.models import AggregateRow, FlavorRow, NodeRow, ServerRow

PLACEMENT_KEY = "cowfleet:placement"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    # isoformat, cut: the same text as strftime("%Y-%m-%dT%H:%M:%SZ") in less than half the
    # time (three per server in a page of 1,000: bench/server_list.py).
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")[:19] + "Z"


def iso_micro(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")[:26]


def link(base: str, kind: str, ident: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base}/v2.1/{kind}/{ident}"},
        {"rel": "bookmark", "href": f"{base}/{kind}/{ident}"},
    ]


def host_status(row: ServerRow, node: NodeRow | None, now: float, down_after: float) -> str:
    if row.host is None:
        return ""
    if node is None:
        return "UNKNOWN"
    if not node.enabled:
        return "MAINTENANCE"
    return "UP" if now - node.last_heartbeat <= down_after else "UNKNOWN"


def server_brief(row: ServerRow, base: str) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "links": link(base, "servers", row.id)}


def server(
    row: ServerRow, ctx: Ctx, base: str, node: NodeRow | None, now: float, down_after: float
) -> dict[str, Any]:
    """A server as ``GET /servers/{id}`` shows it to ``ctx`` at its microversion."""
    flavor: dict[str, Any]
    if ctx.at_least("2.47"):
        flavor = {
            k: row.flavor[k] for k in ("original_name", "vcpus", "ram", "disk", "ephemeral", "swap")
        }
        flavor["extra_specs"] = dict(row.flavor.get("extra_specs") or {})
    else:
        flavor = {"id": row.flavor_id, "links": link(base, "flavors", row.flavor_id)[1:]}
    host_id = hashlib.sha224(f"{row.project_id}{row.host}".encode()).hexdigest() if row.host else ""
    doc: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "status": states.status(row.vm_state, row.task_state),
        "tenant_id": row.project_id,
        "user_id": row.project_id,
        "created": iso(row.created_at),
        "updated": iso(row.updated_at),
        "hostId": host_id,
        "addresses": {},
        "accessIPv4": "",
        "accessIPv6": "",
        "image": {"id": row.image_id, "links": link(base, "images", row.image_id)[1:]},
        "flavor": flavor,
        "links": link(base, "servers", row.id),
        "metadata": {},
        "key_name": None,
        "config_drive": "",
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova" if row.host else "",
        "OS-EXT-STS:vm_state": row.vm_state,
        "OS-EXT-STS:task_state": row.task_state,
        "OS-EXT-STS:power_state": row.power_state,
        "OS-SRV-USG:launched_at": iso_micro(row.launched_at),
        "OS-SRV-USG:terminated_at": None,
        "os-extended-volumes:volumes_attached": [],
        "security_groups": [{"name": "default"}],
    }
    if row.vm_state == states.BUILDING:
        doc["progress"] = 0
    if ctx.is_admin:
        doc["OS-EXT-SRV-ATTR:host"] = row.host
        doc["OS-EXT-SRV-ATTR:hypervisor_hostname"] = row.host
        doc["OS-EXT-SRV-ATTR:instance_name"] = f"instance-{row.id}"
        if row.placement:
            doc[PLACEMENT_KEY] = row.placement
    if ctx.at_least("2.9"):
        doc["locked"] = False
    if ctx.at_least("2.16"):
        doc["host_status"] = host_status(row, node, now, down_after)
    if ctx.at_least("2.19"):
        doc["description"] = None
    if ctx.at_least("2.26"):
        doc["tags"] = []
    if ctx.at_least("2.63"):
        doc["trusted_image_certificates"] = None
    if ctx.at_least("2.73"):
        doc["locked_reason"] = None
    if row.vm_state in (states.ERROR, states.DELETED) and row.fault:
        fault = {
            "code": row.fault.get("code", 500),
            "created": iso(row.fault.get("created")),
            "message": row.fault.get("message", ""),
        }
        if ctx.is_admin:
            fault["details"] = row.fault.get("message", "")
        doc["fault"] = fault
    return doc


def flavor(row: FlavorRow, ctx: Ctx, base: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "vcpus": row.vcpus,
        "ram": row.ram_mb,
        "disk": row.root_gb,
        "OS-FLV-EXT-DATA:ephemeral": row.ephemeral_gb,
        "swap": row.swap_mb if row.swap_mb or ctx.at_least("2.75") else "",
        "os-flavor-access:is_public": row.is_public,
        "OS-FLV-DISABLED:disabled": False,
        "rxtx_factor": 1.0,
        "links": link(base, "flavors", row.id),
    }
    if ctx.at_least("2.55"):
        doc["description"] = row.description
    if ctx.at_least("2.61"):
        doc["extra_specs"] = dict(row.extra_specs or {})
    return doc


def hypervisor(
    node: NodeRow, ctx: Ctx, *, detail: bool, now: float, down_after: float, running: int
) -> dict[str, Any]:
    up = now - node.last_heartbeat <= down_after
    doc: dict[str, Any] = {
        "id": node.id if ctx.at_least("2.53") else node.seq,
        "hypervisor_hostname": node.hostname,
        "state": "up" if up else "down",
        "status": "enabled" if node.enabled else "disabled",
    }
    if not detail:
        return doc
    cpu = {"arch": node.arch} if node.arch else {}
    doc.update(
        {
            "hypervisor_type": node.hypervisor_type,
            "hypervisor_version": 1,
            "host_ip": urlsplit(node.url).hostname or "",
            "service": {
                "host": node.hostname,
                "id": node.id if ctx.at_least("2.53") else node.seq,
                "disabled_reason": node.disabled_reason,
            },
            "vcpus": node.vcpus,
            "vcpus_used": node.vcpus_used,
            "memory_mb": node.ram_mb,
            "memory_mb_used": node.ram_used_mb,
            "free_ram_mb": node.ram_mb - node.ram_used_mb,
            "local_gb": node.disk_gb,
            "local_gb_used": node.disk_used_gb,
            "free_disk_gb": node.disk_gb - node.disk_used_gb,
            "disk_available_least": node.disk_free_gb,
            "running_vms": running,
            "current_workload": 0,
            # A JSON object from 2.28, a string holding one before.
            "cpu_info": cpu if ctx.at_least("2.28") else json.dumps(cpu),
            "cowfleet:cache": list(node.cache or ()),
            "cowfleet:unknown_instances": list(node.unknown or ()),
            "cowfleet:last_heartbeat": iso(node.last_heartbeat),
        }
    )
    return doc


def aggregate(row: AggregateRow, hosts: list[str], ctx: Ctx) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "availability_zone": row.availability_zone,
        "hosts": hosts,
        "metadata": dict(row.meta or {}),
        "created_at": iso_micro(row.created_at),
        "updated_at": iso_micro(row.updated_at),
        "deleted_at": None,
        "deleted": False,
    }
    if ctx.at_least("2.41"):
        doc["uuid"] = row.uuid
    return doc
