"""``/v2.1/os-hypervisors``: the registered node agents (admins only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import func, select

from cowfleet.api import views
from cowfleet.api.context import AdminCtx, Ctx
from cowfleet.api.db.models import NodeRow, ServerRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.fleet import Fleet

router = APIRouter()


def _nodes(
    request: Request, ctx: Ctx, detail: bool, ident: str | None = None
) -> list[dict[str, Any]]:
    fleet: Fleet = request.app.state.fleet
    with fleet.db.read() as s:
        stmt = select(NodeRow).order_by(NodeRow.seq)
        if "hypervisor_hostname_pattern" in request.query_params:
            pattern = request.query_params["hypervisor_hostname_pattern"]
            stmt = stmt.where(NodeRow.hostname.contains(pattern, autoescape=True))
        nodes = list(s.scalars(stmt))
        counts = s.execute(
            select(ServerRow.host, func.count())
            .where(ServerRow.deleted.is_(False), ServerRow.host.is_not(None))
            .group_by(ServerRow.host)
        )
        running = {host: count for host, count in counts if host is not None}
    if ident is not None:
        nodes = [n for n in nodes if ident in (n.id, str(n.seq))]
        if not nodes:
            raise ApiFault(404, f"Hypervisor {ident} could not be found.")
    now = fleet.clock()
    return [
        views.hypervisor(
            n,
            ctx,
            detail=detail,
            now=now,
            down_after=fleet.settings.node_down_after,
            running=running.get(n.hostname, 0),
        )
        for n in nodes
    ]


@router.get("/os-hypervisors")
def list_hypervisors(request: Request, ctx: AdminCtx) -> dict[str, Any]:
    return {"hypervisors": _nodes(request, ctx, detail=False)}


@router.get("/os-hypervisors/detail")
def list_detail(request: Request, ctx: AdminCtx) -> dict[str, Any]:
    return {"hypervisors": _nodes(request, ctx, detail=True)}


@router.get("/os-hypervisors/{hypervisor_id}")
def show(hypervisor_id: str, request: Request, ctx: AdminCtx) -> dict[str, Any]:
    return {"hypervisor": _nodes(request, ctx, detail=True, ident=hypervisor_id)[0]}


@router.get("/os-hypervisors/{hypervisor_id}/uptime")
def uptime(hypervisor_id: str, request: Request, ctx: AdminCtx) -> dict[str, Any]:
    """Node agents do not report the host's uptime: 501, which clients take as "none"."""
    _nodes(request, ctx, detail=False, ident=hypervisor_id)  # 404 for an unknown one
    raise ApiFault(501, "The node agents do not report their host's uptime.")
