"""``/v2.1/servers``: create, list, show, delete, and the start/stop/reboot actions."""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select

from cowfleet.api import states, views
from cowfleet.api.context import Ctx, JsonBody, UserCtx
from cowfleet.api.db.models import NodeRow, ServerRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.fleet import CreateRequest, Fleet
from cowfleet.api.names import check_name
from cowfleet.api.settings import MAX_SERVERS_PER_REQUEST

router = APIRouter()


def _uuid(value: Any, what: str) -> str:
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        raise ApiFault(
            400, f"Invalid {what} provided: {str(value)[:100]!r} is not a UUID."
        ) from None


def _count(server: dict[str, Any], key: str) -> int:
    value = server.get(key, 1)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiFault(400, f"Invalid input for field '{key}': must be an integer of at least 1.")
    return value


def _image_from_bdm(server: dict[str, Any]) -> str | None:
    """The image of the one BDM entry accepted: the local root disk from an image."""
    bdms = server.get("block_device_mapping_v2")
    if bdms is None:
        return None
    if not isinstance(bdms, list):
        raise ApiFault(400, "Invalid input for field 'block_device_mapping_v2': not a list.")
    image = None
    for bdm in bdms:
        if (
            not isinstance(bdm, dict)
            or bdm.get("source_type") != "image"
            or bdm.get("destination_type", "local") != "local"
            or str(bdm.get("boot_index", 0)) != "0"
        ):
            raise ApiFault(
                400,
                "Block device mapping is not supported here, except the root disk "
                "from an image (source_type image, destination_type local, boot_index 0).",
            )
        image = _uuid(bdm.get("uuid"), "image uuid in block_device_mapping_v2")
    return image


def parse_create(body: dict[str, Any], ctx: Ctx) -> CreateRequest:
    """The create request in ``body`` (400 naming the problem otherwise)."""
    server = body.get("server")
    if not isinstance(server, dict):
        raise ApiFault(400, "Invalid input: the body must hold a 'server' object.")
    name = check_name(server.get("name"))
    flavor = server.get("flavorRef")
    if not isinstance(flavor, (str, int)) or isinstance(flavor, bool) or not str(flavor):
        raise ApiFault(400, "Invalid input for field 'flavorRef': required.")
    bdm_image = _image_from_bdm(server)
    image_ref = server.get("imageRef")
    if image_ref in (None, ""):
        if bdm_image is None:
            raise ApiFault(400, "Invalid input for field 'imageRef': required.")
        image = bdm_image
    else:
        if not isinstance(image_ref, str):
            raise ApiFault(400, "Invalid imageRef provided.")
        image = _uuid(image_ref.rstrip("/").rsplit("/", 1)[-1], "imageRef")
        if bdm_image is not None and bdm_image != image:
            raise ApiFault(400, "The block device mapping names another image than imageRef.")
    networks = server.get("networks")
    if networks is None and ctx.at_least("2.37"):
        raise ApiFault(400, "Invalid input for field 'networks': required at 2.37 and later.")
    if networks not in (None, "none", "auto", []):
        raise ApiFault(
            400, "Only 'none' and 'auto' networks are supported: there is no network service."
        )
    min_count, max_count = _count(server, "min_count"), _count(server, "max_count")
    if min_count > max_count:
        raise ApiFault(400, "min_count must be at most max_count.")
    if max_count > MAX_SERVERS_PER_REQUEST:
        raise ApiFault(400, f"max_count is limited to {MAX_SERVERS_PER_REQUEST} per request.")
    return CreateRequest(name.strip(), image, str(flavor), min_count, max_count)


def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post("/servers", status_code=202)
def create(request: Request, ctx: UserCtx, body: JsonBody) -> dict[str, Any]:
    req = parse_create(body, ctx)
    rows = _fleet(request).create_servers(ctx.project, ctx.token, req)
    first = rows[0]
    return {
        "server": {
            "id": first.id,
            "links": views.link(_base(request), "servers", first.id),
            "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": "default"}],
        }
    }


def _list(request: Request, ctx: Ctx, detail: bool) -> dict[str, Any]:
    fleet = _fleet(request)
    q = request.query_params
    limit = fleet.settings.page_limit
    if "limit" in q:
        try:
            limit = int(q["limit"])
        except ValueError:
            raise ApiFault(400, "limit must be an integer") from None
        if limit < 0:
            raise ApiFault(400, "limit must be at least 0")
        limit = min(limit, fleet.settings.page_limit)
    stmt = select(ServerRow).where(ServerRow.deleted.is_(False))
    all_tenants = ctx.is_admin and q.get("all_tenants", "0").lower() not in ("0", "false", "")
    if not all_tenants:
        stmt = stmt.where(
            ServerRow.project_id == q.get("project_id", ctx.project)
            if ctx.is_admin
            else ServerRow.project_id == ctx.project
        )
    elif ctx.is_admin and "project_id" in q:
        stmt = stmt.where(ServerRow.project_id == q["project_id"])
    if "status" in q:
        vm = states.STATUS_TO_VM.get(q["status"].upper())
        if vm is None:
            return {"servers": []}
        stmt = stmt.where(ServerRow.vm_state == vm)
    if "host" in q and ctx.is_admin:
        stmt = stmt.where(ServerRow.host == q["host"])
    name_re = None
    if q.get("name"):
        try:
            name_re = re.compile(q["name"])
        except re.error:
            name_re = re.compile(re.escape(q["name"]))
    with fleet.db.read() as s:
        if "marker" in q:
            marker = s.scalars(
                select(ServerRow).where(ServerRow.id == q["marker"], ServerRow.deleted.is_(False))
            ).one_or_none()
            if marker is None or (not ctx.is_admin and marker.project_id != ctx.project):
                raise ApiFault(400, f"marker [{q['marker']}] not found")
            stmt = stmt.where(ServerRow.seq < marker.seq)
        stmt = stmt.order_by(ServerRow.seq.desc())
        if name_re is None:
            found = list(s.scalars(stmt.limit(limit)))
        else:
            found = []
            for row in s.scalars(stmt.execution_options(yield_per=500)):
                if name_re.search(row.name):
                    found.append(row)
                    if len(found) >= limit:
                        break
        nodes = {n.hostname: n for n in s.scalars(select(NodeRow))} if detail else {}
    base = _base(request)
    now = fleet.clock()
    if detail:
        items = [
            views.server(r, ctx, base, nodes.get(r.host or ""), now, fleet.settings.node_down_after)
            for r in found
        ]
    else:
        items = [views.server_brief(r, base) for r in found]
    doc: dict[str, Any] = {"servers": items}
    if found and len(found) == limit:
        params = {k: v for k, v in q.items() if k not in ("marker",)}
        params["marker"] = found[-1].id
        params["limit"] = str(limit)
        query = urlencode(params)
        path = "servers/detail" if detail else "servers"
        doc["servers_links"] = [{"rel": "next", "href": f"{base}/v2.1/{path}?{query}"}]
    return doc


# Lists answer a JSONResponse directly: FastAPI's encoder walks every value of a returned
# dict again, which costs more than building a page of 1,000 servers.
@router.get("/servers")
def list_servers(request: Request, ctx: UserCtx) -> JSONResponse:
    return JSONResponse(_list(request, ctx, detail=False))


@router.get("/servers/detail")
def list_detail(request: Request, ctx: UserCtx) -> JSONResponse:
    return JSONResponse(_list(request, ctx, detail=True))


@router.get("/servers/{server_id}")
def show(server_id: str, request: Request, ctx: UserCtx) -> dict[str, Any]:
    fleet = _fleet(request)
    with fleet.db.read() as s:
        row = fleet.visible(s, server_id, ctx.project, ctx.is_admin)
        node = (
            s.scalars(select(NodeRow).where(NodeRow.hostname == row.host)).one_or_none()
            if row.host
            else None
        )
    return {
        "server": views.server(
            row, ctx, _base(request), node, fleet.clock(), fleet.settings.node_down_after
        )
    }


@router.delete("/servers/{server_id}", status_code=204)
def delete(server_id: str, request: Request, ctx: UserCtx) -> Response:
    _fleet(request).delete_server(server_id, ctx.project, ctx.is_admin)
    return Response(status_code=204)


@router.post("/servers/{server_id}/action", status_code=202)
def action(
    server_id: str,
    request: Request,
    ctx: UserCtx,
    body: JsonBody,
) -> Response:
    if len(body) != 1:
        raise ApiFault(400, "The action body must hold exactly one action.")
    name, arg = next(iter(body.items()))
    fleet = _fleet(request)
    if name == "os-start":
        fleet.action(server_id, ctx.project, ctx.is_admin, "start", "")
    elif name == "os-stop":
        fleet.action(server_id, ctx.project, ctx.is_admin, "stop", "")
    elif name == "reboot":
        kind = arg.get("type") if isinstance(arg, dict) else None
        if not isinstance(kind, str) or kind.upper() not in ("SOFT", "HARD"):
            raise ApiFault(400, "Invalid input for field 'type': must be SOFT or HARD.")
        fleet.action(server_id, ctx.project, ctx.is_admin, "reboot", kind.upper())
    elif name == "createImage":
        from cowfleet.api import snapshots

        image_id = snapshots.create(fleet, ctx, server_id, arg)
        if ctx.at_least("2.45"):
            return JSONResponse({"image_id": image_id}, status_code=202)
        location = f"{fleet.settings.image_url.rstrip('/')}/v2/images/{image_id}"
        return Response(status_code=202, headers={"Location": location})
    else:
        with fleet.db.read() as s:
            fleet.visible(s, server_id, ctx.project, ctx.is_admin)
        raise ApiFault(400, f"There is no such action: {name[:64]}")
    return Response(status_code=202)
