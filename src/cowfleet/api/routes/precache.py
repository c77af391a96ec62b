"""Pre-cache routes: Nova's ``POST /os-aggregates/{id}/images`` (2.81), cowfleet's
progress resource ``/cowfleet/precache`` (admins only), and the nodes' progress reports.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from cowfleet import precache as pc
from cowfleet.api.context import AdminCtx, JsonBody, NodeCaller
from cowfleet.api.db.models import AggregateHostRow, AggregateRow, NodeRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.precache import Precaches, Target
from cowfleet.api.routes.aggregates import _load

router = APIRouter()
internal_router = APIRouter()

# Nova answers a method missing at the requested version with a bare 404.
_NOT_FOUND = "The resource could not be found."
_MAX_HOSTS = 100000


def _precaches(request: Request) -> Precaches:
    svc: Precaches = request.app.state.precaches
    return svc


def _uuid(value: Any, what: str) -> str:
    try:
        return str(uuidlib.UUID(value)) if isinstance(value, str) else _bad(what)
    except ValueError:
        return _bad(what)


def _bad(what: str) -> str:
    raise ApiFault(400, f"Invalid input for field '{what}': it must be an image UUID.")


def parse_cache_body(body: dict[str, Any]) -> list[str]:
    """Nova's aggregate-images body: ``{"cache": [{"id": UUID}, ...]}``; 400 otherwise."""
    if set(body) != {"cache"}:
        extra = sorted(set(body) - {"cache"})
        raise ApiFault(
            400,
            f"Invalid input: additional properties are not allowed ({', '.join(extra)})"
            if extra
            else "Invalid input: 'cache' is a required property.",
        )
    items = body["cache"]
    if not isinstance(items, list) or not items:
        raise ApiFault(400, "Invalid input for field 'cache': a non-empty list is required.")
    ids: list[str] = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"id"}:
            raise ApiFault(400, "Invalid input for field 'cache': each item is {\"id\": UUID}.")
        ids.append(_uuid(item["id"], "cache/id"))
    if len(set(ids)) != len(ids):
        raise ApiFault(400, "Duplicate images in request.")
    return ids


@router.post("/os-aggregates/{aggregate_id}/images", status_code=202)
def aggregate_images(
    aggregate_id: str, request: Request, ctx: AdminCtx, body: JsonBody
) -> Response:
    if not ctx.at_least("2.81"):
        raise ApiFault(404, _NOT_FOUND)
    images = parse_cache_body(body)
    svc = _precaches(request)
    with svc.fleet.db.read() as s:
        agg = _load(s, aggregate_id)
        hosts = tuple(
            s.scalars(
                select(AggregateHostRow.host)
                .where(AggregateHostRow.aggregate_id == agg.id)
                .order_by(AggregateHostRow.seq)
            )
        )
    for image_id in images:  # every image checked before anything starts
        info = svc.fleet.images.get(image_id, ctx.token)
        if info.status != "active":
            raise ApiFault(400, f"Image {image_id} is {info.status}, not active.")
    target = Target("aggregate", hosts, aggregate=agg.id)
    ids = [svc.start(image_id, target, ctx.token) for image_id in images]
    # Nova's body is empty; the progress resources are named in a header.
    return Response(status_code=202, headers={"Cowfleet-Precache": ", ".join(ids)})


def _target(request: Request, body: dict[str, Any]) -> Target:
    given = [k for k in ("aggregate", "hosts", "all") if body.get(k) not in (None, False)]
    if len(given) != 1:
        raise ApiFault(400, "Give exactly one of 'aggregate', 'hosts' or 'all': true.")
    fleet = _precaches(request).fleet
    with fleet.db.read() as s:
        if given == ["all"]:
            if body["all"] is not True:
                raise ApiFault(400, "Invalid input for field 'all': true is expected.")
            hosts = tuple(s.scalars(select(NodeRow.hostname).order_by(NodeRow.seq)))
            return Target("all", hosts)
        if given == ["hosts"]:
            names = body["hosts"]
            if (
                not isinstance(names, list)
                or not 0 < len(names) <= _MAX_HOSTS
                or not all(isinstance(h, str) and 0 < len(h) <= 255 for h in names)
            ):
                raise ApiFault(400, "Invalid input for field 'hosts': a list of host names.")
            known = set(s.scalars(select(NodeRow.hostname).where(NodeRow.hostname.in_(names))))
            unknown = [h for h in names if h not in known]
            if unknown:
                raise ApiFault(
                    400, f"Compute host(s) {', '.join(unknown[:10])} could not be found."
                )
            return Target("hosts", tuple(dict.fromkeys(names)))
        ref = body["aggregate"]
        agg = None
        if isinstance(ref, str) and not ref.isdigit():
            agg = s.scalars(select(AggregateRow).where(AggregateRow.name == ref)).one_or_none()
            if agg is None:
                raise ApiFault(404, f"Aggregate {ref[:64]} could not be found.")
        else:
            agg = _load(s, str(ref))
        hosts = tuple(
            s.scalars(
                select(AggregateHostRow.host)
                .where(AggregateHostRow.aggregate_id == agg.id)
                .order_by(AggregateHostRow.seq)
            )
        )
        return Target("aggregate", hosts, aggregate=agg.id)


@router.post("/cowfleet/precache", status_code=202)
def create(request: Request, ctx: AdminCtx, body: JsonBody) -> dict[str, Any]:
    """``{"image_id": UUID, "aggregate": id|name | "hosts": [...] | "all": true}``."""
    image_id = _uuid(body.get("image_id"), "image_id")
    target = _target(request, body)
    svc = _precaches(request)
    pid = svc.start(image_id, target, ctx.token)
    return {"precache": svc.show(pid)}


@router.get("/cowfleet/precache")
def list_precaches(request: Request, ctx: AdminCtx, image_id: str | None = None) -> dict[str, Any]:
    return {"precaches": _precaches(request).summaries(image_id)}


@router.get("/cowfleet/precache/{precache_id}")
def show(precache_id: str, request: Request, ctx: AdminCtx) -> dict[str, Any]:
    return {"precache": _precaches(request).show(precache_id)}


@internal_router.post("/internal/nodes/{hostname}/precache/{precache_id}", status_code=204)
def progress(
    hostname: str, precache_id: str, request: Request, _: NodeCaller, body: JsonBody
) -> Response:
    try:
        prog = pc.NodeProgress.from_json(body)
    except ValueError as exc:
        raise ApiFault(400, str(exc)) from None
    _precaches(request).record(precache_id, hostname, prog)
    return Response(status_code=204)
