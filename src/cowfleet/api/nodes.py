"""Node registration, heartbeats and events (``/internal``), and acting on reconcile plans."""

from __future__ import annotations

import logging
import re
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from cowfleet.api import states
from cowfleet.api.db.models import NodeRow, ServerRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.fleet import Fleet
from cowfleet.api.nodes_client import NODE_STATES
from cowfleet.api.reconcile import Known, Plan, Reported, plan

log = logging.getLogger(__name__)

HOSTNAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
_MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class Report:
    """A validated heartbeat body."""

    hostname: str
    url: str
    hypervisor_type: str
    arch: str | None
    vcpus: int
    ram_mb: int
    disk_gb: int
    disk_free_gb: int
    cache: tuple[dict[str, Any], ...]
    instances: tuple[Reported, ...]


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT:
        raise ApiFault(400, f"'{key}' must be a whole number from 0 to {_MAX_INT}")
    return value


def parse_instance(item: Any) -> Reported:
    if not isinstance(item, dict):
        raise ApiFault(400, "an instance must be an object")
    uuid, state = item.get("uuid"), item.get("state")
    try:
        uuidlib.UUID(str(uuid))
    except ValueError:
        raise ApiFault(400, f"instance uuid {uuid!r} is not a UUID") from None
    if state not in (*NODE_STATES, "DELETED"):
        raise ApiFault(
            400, f"instance state {state!r} is not one of {', '.join(NODE_STATES)}, DELETED"
        )
    power = item.get("power_state", 0)
    fault = item.get("fault")
    return Reported(
        uuid=str(uuid),
        state=str(state),
        power_state=power if isinstance(power, int) and not isinstance(power, bool) else 0,
        fault=str(fault)[:1024] if fault else None,
    )


def parse_report(hostname: str, doc: dict[str, Any]) -> Report:
    if not HOSTNAME.fullmatch(hostname):
        raise ApiFault(400, "hostname must be 1-255 characters of A-Z a-z 0-9 . _ -")
    if doc.get("hostname", hostname) != hostname:
        raise ApiFault(400, "the body's hostname differs from the one in the path")
    url = doc.get("url")
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url) or len(url) > 2048:
        raise ApiFault(400, "'url' must be the node agent's http(s) URL")
    hv = doc.get("hypervisor_type")
    if not isinstance(hv, str) or not 0 < len(hv) <= 64:
        raise ApiFault(400, "'hypervisor_type' must be a short string")
    arch = doc.get("arch")
    if arch is not None and (not isinstance(arch, str) or len(arch) > 32):
        raise ApiFault(400, "'arch' must be a short string")
    cache = doc.get("cache", [])
    instances = doc.get("instances", [])
    if not isinstance(cache, list) or not all(isinstance(c, dict) for c in cache):
        raise ApiFault(400, "'cache' must be a list of objects")
    if not isinstance(instances, list):
        raise ApiFault(400, "'instances' must be a list")
    return Report(
        hostname=hostname,
        url=url.rstrip("/"),
        hypervisor_type=hv,
        arch=arch,
        vcpus=_int(doc, "vcpus"),
        ram_mb=_int(doc, "ram_mb"),
        disk_gb=_int(doc, "disk_gb"),
        disk_free_gb=_int(doc, "disk_free_gb") if "disk_free_gb" in doc else _int(doc, "disk_gb"),
        cache=tuple(
            {
                "image_id": str(c.get("image_id")),
                "verified": bool(c.get("verified")),
                "bytes": c.get("bytes") if isinstance(c.get("bytes"), int) else None,
                **cache_detail(c),
            }
            for c in cache
        ),
        instances=tuple(parse_instance(i) for i in instances),
    )


CACHE_STATES = ("verified", "unverified", "failed", "fetching", "quarantined")


def cache_detail(c: dict[str, Any]) -> dict[str, Any]:
    """The optional parts of a cache entry (state, fetch percent and size, image name),
    validated."""
    out: dict[str, Any] = {}
    if c.get("state") in CACHE_STATES:
        out["state"] = c["state"]
    pct = c.get("percent")
    if isinstance(pct, (int, float)) and not isinstance(pct, bool) and 0 <= pct <= 100:
        out["percent"] = float(pct)
    name = c.get("name")
    if isinstance(name, str) and name:
        out["name"] = name[:255]
    size = c.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        out["size"] = size
    return out


def heartbeat(fleet: Fleet, report: Report) -> NodeRow:
    """Register or refresh the node, then reconcile its instances with the API's."""
    now = fleet.clock()
    values: dict[str, Any] = {
        "url": report.url,
        "hypervisor_type": report.hypervisor_type,
        "arch": report.arch,
        "vcpus": report.vcpus,
        "ram_mb": report.ram_mb,
        "disk_gb": report.disk_gb,
        "disk_free_gb": report.disk_free_gb,
        "cache": list(report.cache),
        "instances": [r.__dict__ for r in report.instances],
        "last_heartbeat": now,
    }
    node: NodeRow | None = None
    for _ in range(3):
        try:
            with fleet.db.write() as s:
                node = s.scalars(
                    select(NodeRow).where(NodeRow.hostname == report.hostname)
                ).one_or_none()
                if node is None:
                    node = NodeRow(
                        id=str(uuidlib.uuid4()),
                        hostname=report.hostname,
                        enabled=True,
                        vcpus_used=0,
                        ram_used_mb=0,
                        disk_used_gb=0,
                        unknown=[],
                        created_at=now,
                        **values,
                    )
                    s.add(node)
                    log.warning("node %s registered from %s", report.hostname, report.url)
                else:
                    if node.url != report.url:
                        log.warning("node %s now at %s", report.hostname, report.url)
                    for key, value in values.items():
                        setattr(node, key, value)
            break
        except IntegrityError:  # registered by another replica meanwhile: update it
            continue
    if node is None:
        raise ApiFault(503, f"node {report.hostname} could not be recorded")
    steps = reconcile(fleet, report.hostname, report.instances, complete=True)
    if set(steps.unknown) != set(node.unknown or ()):
        if steps.unknown:
            log.warning(
                "node %s has instances the API does not know (left alone): %s",
                report.hostname,
                ", ".join(steps.unknown),
            )
        with fleet.db.write() as s:
            s.execute(
                update(NodeRow)
                .where(NodeRow.hostname == report.hostname)
                .values(unknown=list(steps.unknown))
            )
    return node


def event(fleet: Fleet, hostname: str, instance: Reported) -> None:
    with fleet.db.read() as s:
        known = s.scalars(select(NodeRow.id).where(NodeRow.hostname == hostname)).one_or_none()
    if known is None:
        raise ApiFault(404, f"node {hostname} is not registered")
    reconcile(fleet, hostname, (instance,), complete=False)


def reconcile(
    fleet: Fleet, hostname: str, reported: tuple[Reported, ...], *, complete: bool
) -> Plan:
    ids = [r.uuid for r in reported]
    with fleet.db.read() as s:
        mine = or_(
            (ServerRow.host == hostname) & ServerRow.deleted.is_(False),
            (ServerRow.claim_host == hostname) & ServerRow.deleted.is_(True),
        )
        rows = s.scalars(select(ServerRow).where(or_(mine, ServerRow.id.in_(ids)))).all()
        known = [
            Known(
                r.id, r.vm_state, r.task_state, r.deleted, r.updated_at, r.deadline, r.power_state
            )
            for r in rows
            if r.deleted or r.host == hostname
        ]
        # Servers the node has but that the API placed elsewhere are not this node's.
        elsewhere = {r.id for r in rows if not r.deleted and r.host != hostname}
    # A copy of a server the API moved to another host (a build retried elsewhere) is
    # stale here: the API knows the server, so this is no unknown instance to spare.
    stale = [r.uuid for r in reported if r.uuid in elsewhere and r.state != "DELETING"]
    reported = tuple(r for r in reported if r.uuid not in elsewhere)
    steps = plan(
        hostname,
        reported,
        known,
        fleet.clock(),
        complete=complete,
        absent_grace=max(3 * fleet.settings.heartbeat_interval, 30.0),
    )
    by_id = {k.id: k for k in known}
    for u in steps.updates:
        fleet.apply_state(
            u.id,
            by_id[u.id].vm_state,
            _node_state(u.vm_state),
            clear_task=u.clear_task,
            fault=u.fault,
        )
    for r in steps.reschedules:
        fleet.reschedule(r.id, hostname, r.cause, delete_on_node=r.delete_on_node, queue=True)
    for uuid in (*steps.deletes, *stale):
        fleet.submit(fleet._delete_on_node, uuid, hostname)
    if steps.forgets:
        from cowfleet.scheduler.claims import release

        with fleet.db.write() as s:
            for server_id in steps.forgets:
                release(s, server_id, only_on=hostname)
    return steps


def _node_state(vm_state: str) -> str:
    return {states.ACTIVE: "ACTIVE", states.STOPPED: "SHUTOFF", states.ERROR: "ERROR"}[vm_state]
