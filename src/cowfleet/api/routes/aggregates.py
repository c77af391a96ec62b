"""``/v2.1/os-aggregates``: host aggregates (admins only; integer ids as in Nova)."""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cowfleet.api import views
from cowfleet.api.context import AdminCtx, JsonBody
from cowfleet.api.db.models import AggregateHostRow, AggregateRow, NodeRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.fleet import Fleet

router = APIRouter()


def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


def _int_id(aggregate_id: str) -> int:
    try:
        value = int(aggregate_id)
    except ValueError:
        raise ApiFault(400, f"Aggregate id {aggregate_id[:64]!r} is not an integer.") from None
    if not 0 < value <= 2**31 - 1:
        raise ApiFault(400, f"Aggregate id {value} is out of range.")
    return value


def _load(s: Session, aggregate_id: str) -> AggregateRow:
    row = s.get(AggregateRow, _int_id(aggregate_id))
    if row is None:
        raise ApiFault(404, f"Aggregate {aggregate_id} could not be found.")
    return row


def _hosts(s: Session, agg_id: int) -> list[str]:
    return list(
        s.scalars(
            select(AggregateHostRow.host)
            .where(AggregateHostRow.aggregate_id == agg_id)
            .order_by(AggregateHostRow.seq)
        )
    )


def _name(value: Any, what: str, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 255:
        raise ApiFault(400, f"Invalid input for field '{what}': 1-255 characters.")
    return value.strip()


@router.get("/os-aggregates")
def list_aggregates(request: Request, ctx: AdminCtx) -> dict[str, Any]:
    with _fleet(request).db.read() as s:
        rows = list(s.scalars(select(AggregateRow).order_by(AggregateRow.id)))
        return {"aggregates": [views.aggregate(r, _hosts(s, r.id), ctx) for r in rows]}


@router.get("/os-aggregates/{aggregate_id}")
def show(aggregate_id: str, request: Request, ctx: AdminCtx) -> dict[str, Any]:
    with _fleet(request).db.read() as s:
        row = _load(s, aggregate_id)
        return {"aggregate": views.aggregate(row, _hosts(s, row.id), ctx)}


@router.post("/os-aggregates")
def create(request: Request, ctx: AdminCtx, body: JsonBody) -> dict[str, Any]:
    doc = body.get("aggregate")
    if not isinstance(doc, dict):
        raise ApiFault(400, "Invalid input: the body must hold an 'aggregate' object.")
    name = _name(doc.get("name"), "name", required=True)
    zone = _name(doc.get("availability_zone"), "availability_zone", required=False)
    fleet = _fleet(request)
    row = AggregateRow(
        uuid=str(uuidlib.uuid4()),
        name=name,
        availability_zone=zone,
        meta={},
        created_at=fleet.clock(),
    )
    try:
        with fleet.db.write() as s:
            s.add(row)
            s.flush()
            out = views.aggregate(row, [], ctx)
    except IntegrityError:
        raise ApiFault(409, f"Aggregate {name} already exists.") from None
    return {"aggregate": out}


@router.delete("/os-aggregates/{aggregate_id}")
def delete(aggregate_id: str, request: Request, ctx: AdminCtx) -> Response:
    with _fleet(request).db.write() as s:
        row = _load(s, aggregate_id)
        if _hosts(s, row.id):
            raise ApiFault(400, f"Cannot delete aggregate {aggregate_id}: it still has hosts.")
        s.delete(row)
    return Response(status_code=200)


@router.post("/os-aggregates/{aggregate_id}/action")
def act(
    aggregate_id: str,
    request: Request,
    ctx: AdminCtx,
    body: JsonBody,
) -> dict[str, Any]:
    if len(body) != 1:
        raise ApiFault(400, "The action body must hold exactly one action.")
    name, arg = next(iter(body.items()))
    if name not in ("add_host", "remove_host"):
        raise ApiFault(400, f"There is no such aggregate action: {name[:64]}")
    host = _name(arg.get("host") if isinstance(arg, dict) else None, "host", required=True)
    fleet = _fleet(request)
    try:
        with fleet.db.write() as s:
            row = _load(s, aggregate_id)
            present = host in _hosts(s, row.id)
            if name == "add_host":
                if s.scalars(select(NodeRow.id).where(NodeRow.hostname == host)).first() is None:
                    raise ApiFault(404, f"Compute host {host} could not be found.")
                if present:
                    raise ApiFault(409, f"Aggregate {aggregate_id} already has host {host}.")
                s.add(AggregateHostRow(aggregate_id=row.id, host=host))
            else:
                if not present:
                    raise ApiFault(
                        404,
                        f"Cannot remove host {host} from aggregate "
                        f"{aggregate_id}: it is not a member.",
                    )
                for member in s.scalars(
                    select(AggregateHostRow).where(
                        AggregateHostRow.aggregate_id == row.id, AggregateHostRow.host == host
                    )
                ):
                    s.delete(member)
            row.updated_at = fleet.clock()
            s.flush()
            out = views.aggregate(row, _hosts(s, row.id), ctx)
    except IntegrityError:
        raise ApiFault(409, f"Aggregate {aggregate_id} already has host {host}.") from None
    return {"aggregate": out}
