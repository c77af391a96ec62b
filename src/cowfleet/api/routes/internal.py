"""``/internal``: node agents register, heartbeat and push events (node tokens only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from cowfleet.api import nodes
from cowfleet.api.context import JsonBody, NodeCaller
from cowfleet.api.fleet import Fleet

router = APIRouter()


def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


@router.put("/internal/nodes/{hostname}")
def heartbeat(
    hostname: str,
    request: Request,
    _: NodeCaller,
    body: JsonBody,
) -> dict[str, Any]:
    fleet = _fleet(request)
    row = nodes.heartbeat(fleet, nodes.parse_report(hostname, body))
    return {"node_id": row.id, "heartbeat_interval": fleet.settings.heartbeat_interval}


@router.post("/internal/nodes/{hostname}/events", status_code=204)
def event(
    hostname: str,
    request: Request,
    _: NodeCaller,
    body: JsonBody,
) -> Response:
    nodes.event(_fleet(request), hostname, nodes.parse_instance(body))
    return Response(status_code=204)
