"""``/v2.1/flavors``: list, detail, show, extra specs; create and delete for admins."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from cowfleet.api import views
from cowfleet.api.context import AdminCtx, Ctx, JsonBody, UserCtx
from cowfleet.api.db.engine import Database
from cowfleet.api.db.models import FlavorRow
from cowfleet.api.faults import ApiFault

router = APIRouter()

_FLAVOR_ID = re.compile(r"^[\w.\- ]{1,255}$")


def _db(request: Request) -> Database:
    db: Database = request.app.state.fleet.db
    return db


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _get(db: Database, flavor_id: str) -> FlavorRow:
    with db.read() as s:
        row = s.scalars(select(FlavorRow).where(FlavorRow.id == flavor_id)).one_or_none()
    if row is None:
        raise ApiFault(404, f"Flavor {flavor_id} could not be found.")
    return row


def _listing(request: Request, ctx: Ctx) -> list[FlavorRow]:
    q = request.query_params
    stmt = select(FlavorRow).order_by(FlavorRow.seq)
    public = q.get("is_public", "true").lower()
    if not ctx.is_admin or public in ("true", "1", "yes"):
        stmt = stmt.where(FlavorRow.is_public.is_(True))
    elif public in ("false", "0", "no"):
        stmt = stmt.where(FlavorRow.is_public.is_(False))
    for key, column in (("minDisk", FlavorRow.root_gb), ("minRam", FlavorRow.ram_mb)):
        if key in q:
            try:
                stmt = stmt.where(column >= int(q[key]))
            except ValueError:
                raise ApiFault(400, f"Invalid {key} filter: {q[key][:32]!r}") from None
    with _db(request).read() as s:
        found = list(s.scalars(stmt))
    if "marker" in q:
        ids = [f.id for f in found]
        if q["marker"] not in ids:
            raise ApiFault(400, f"marker [{q['marker']}] not found")
        found = found[ids.index(q["marker"]) + 1 :]
    if "limit" in q:
        try:
            found = found[: max(0, int(q["limit"]))]
        except ValueError:
            raise ApiFault(400, "limit must be an integer") from None
    return found


@router.get("/flavors")
def list_flavors(request: Request, ctx: UserCtx) -> dict[str, Any]:
    base = _base(request)
    return {
        "flavors": [
            {
                "id": f.id,
                "name": f.name,
                "links": views.link(base, "flavors", f.id),
                **({"description": f.description} if ctx.at_least("2.55") else {}),
            }
            for f in _listing(request, ctx)
        ]
    }


@router.get("/flavors/detail")
def list_detail(request: Request, ctx: UserCtx) -> dict[str, Any]:
    base = _base(request)
    return {"flavors": [views.flavor(f, ctx, base) for f in _listing(request, ctx)]}


@router.get("/flavors/{flavor_id}")
def show(flavor_id: str, request: Request, ctx: UserCtx) -> dict[str, Any]:
    return {"flavor": views.flavor(_get(_db(request), flavor_id), ctx, _base(request))}


@router.get("/flavors/{flavor_id}/os-extra_specs")
def extra_specs(flavor_id: str, request: Request, ctx: UserCtx) -> dict[str, Any]:
    return {"extra_specs": dict(_get(_db(request), flavor_id).extra_specs or {})}


def _nonneg(doc: dict[str, Any], key: str, default: int | None = None, *, low: int = 0) -> int:
    value = doc.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 2**31 - 1:
        raise ApiFault(400, f"Invalid input for field '{key}': an integer from {low} is needed.")
    return value


@router.post("/flavors")
def create(request: Request, ctx: AdminCtx, body: JsonBody) -> dict[str, Any]:
    doc = body.get("flavor")
    if not isinstance(doc, dict):
        raise ApiFault(400, "Invalid input: the body must hold a 'flavor' object.")
    name = doc.get("name")
    if not isinstance(name, str) or not 0 < len(name.strip()) <= 255:
        raise ApiFault(400, "Invalid input for field 'name': 1-255 characters.")
    flavor_id = doc.get("id") or name.strip()
    if not isinstance(flavor_id, str) or not _FLAVOR_ID.match(flavor_id):
        raise ApiFault(400, "Invalid input for field 'id': letters, digits, '.', '-', '_'.")
    swap = doc.get("swap", 0)
    row = FlavorRow(
        id=flavor_id,
        name=name.strip(),
        vcpus=_nonneg(doc, "vcpus", low=1),
        ram_mb=_nonneg(doc, "ram", low=1),
        root_gb=_nonneg(doc, "disk"),
        ephemeral_gb=_nonneg(doc, "OS-FLV-EXT-DATA:ephemeral", 0),
        swap_mb=0 if swap == "" else _nonneg(doc, "swap", 0),
        is_public=bool(doc.get("os-flavor-access:is_public", True)),
        description=doc.get("description") if isinstance(doc.get("description"), str) else None,
        extra_specs={},
    )
    try:
        with _db(request).write() as s:
            s.add(row)
    except IntegrityError:
        raise ApiFault(409, f"Flavor with name {name} or id {flavor_id} already exists.") from None
    return {"flavor": views.flavor(row, ctx, _base(request))}


@router.delete("/flavors/{flavor_id}", status_code=202)
def delete(flavor_id: str, request: Request, ctx: AdminCtx) -> Response:
    db = _db(request)
    with db.write() as s:
        row = s.scalars(select(FlavorRow).where(FlavorRow.id == flavor_id)).one_or_none()
        if row is None:
            raise ApiFault(404, f"Flavor {flavor_id} could not be found.")
        s.delete(row)
    return Response(status_code=202)
