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


@router.post("/internal/nodes/{hostname}/peer-reports", status_code=204)
def peer_report(
    hostname: str,
    request: Request,
    _: NodeCaller,
    body: JsonBody,
) -> Response:
    """A node caught a peer sending a piece that failed the hash tree: the peer is not
    assigned as a source of that image again (see cowfleet.api.distribution)."""
    from cowfleet.api.faults import ApiFault
    from cowfleet.cache.layout import is_image_id

    peer, image_id, reason = body.get("peer"), body.get("image_id"), body.get("reason")
    if not isinstance(peer, str) or not 0 < len(peer) <= 255:
        raise ApiFault(400, "'peer' must be a node hostname")
    if not isinstance(image_id, str) or not is_image_id(image_id):
        raise ApiFault(400, "'image_id' must be an image UUID")
    text = reason[:500] if isinstance(reason, str) else ""
    _fleet(request).peer_flags.flag(peer, image_id, text, hostname)
    return Response(status_code=204)
