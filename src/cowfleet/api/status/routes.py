"""``/status`` (HTML), ``/status/data`` (the same data, polled by the page),
``POST /status/login`` and ``POST /status/logout``.

Status codes: 200 the page; 401 the sign-in form (no token, or one the tokens file
does not hold); 403 a node token, or a login form posted from another origin;
303 after signing in or out; 400 a login body that is not a form or too large.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from cowfleet.api.db.models import NodeRow, PrecacheNodeRow, PrecacheRow, ServerRow
from cowfleet.api.fleet import Fleet
from cowfleet.api.status import auth, render
from cowfleet.api.status.view import NodeSnap, ServerSnap, StatusView, build_view
from cowfleet.api.status.view import PrecacheRow as PrecacheLine
from cowfleet.precache import TERMINAL
from cowfleet.tokens import Principal, TokenTable

router = APIRouter()
# Servers read for "recent builds": the newest ones (the view keeps RECENT_BUILDS).
_SERVER_WINDOW = 200


def _headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            "default-src 'none'; "
            f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        ),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "DENY",
    }


def snapshot(fleet: Fleet, principal: Principal) -> StatusView:
    """Read the tables once and build the caller's view."""
    with fleet.db.read() as s:
        nodes = (
            [
                NodeSnap(
                    hostname=n.hostname,
                    enabled=n.enabled,
                    last_heartbeat=n.last_heartbeat,
                    vcpus=n.vcpus,
                    vcpus_used=n.vcpus_used,
                    ram_mb=n.ram_mb,
                    ram_used_mb=n.ram_used_mb,
                    disk_gb=n.disk_gb,
                    disk_used_gb=n.disk_used_gb,
                    disk_free_gb=n.disk_free_gb,
                    instances=len(n.instances or ()),
                    cache=tuple(c for c in n.cache or () if isinstance(c, dict)),
                )
                for n in s.scalars(select(NodeRow).order_by(NodeRow.hostname))
            ]
            if principal.is_admin
            else []
        )
        stmt = select(ServerRow).order_by(ServerRow.created_at.desc()).limit(_SERVER_WINDOW)
        if not principal.is_admin:
            stmt = stmt.where(ServerRow.project_id == principal.project)
        names = {
            str(c.get("image_id")): c["name"]
            for n in nodes
            for c in n.cache
            if isinstance(c.get("name"), str)
        }
        servers = [
            ServerSnap(
                id=r.id,
                name=r.name,
                project_id=r.project_id,
                image_id=r.image_id,
                image_name=names.get(r.image_id),
                host=r.host,
                vm_state=r.vm_state,
                deleted=r.deleted,
                created_at=r.created_at,
                updated_at=r.updated_at,
                launched_at=r.launched_at,
            )
            for r in s.scalars(stmt)
        ]
        precaching = _precaching(s, names) if principal.is_admin else []
    return build_view(
        nodes,
        servers,
        now=fleet.clock(),
        down_after=fleet.settings.node_down_after,
        admin=principal.is_admin,
        project=principal.project,
        precaching=precaching,
    )


def _precaching(s: Session, names: dict[str, str]) -> list[PrecacheLine]:
    """Nodes of the pre-caches still under way (any node not yet done), from the API's rows."""
    rows = s.execute(
        select(PrecacheNodeRow, PrecacheRow.image_id)
        .join(PrecacheRow, PrecacheRow.id == PrecacheNodeRow.precache_id)
        .where(PrecacheNodeRow.state.not_in(TERMINAL))
        .order_by(PrecacheNodeRow.host)
    ).all()
    out = []
    for n, image_id in rows:
        total = n.bytes_total
        out.append(
            PrecacheLine(
                node=n.host,
                image_id=image_id,
                image_name=names.get(image_id),
                percent=100.0 * n.bytes_done / total if total else None,
                bytes=n.bytes_done,
                size=total,
                state=n.state,
            )
        )
    return out


def _login(nonce: str, status: int, message: str | None = None) -> HTMLResponse:
    return HTMLResponse(render.login_page(nonce, message), status, headers=_headers(nonce))


def _caller(request: Request) -> Principal | None:
    tokens: TokenTable = request.app.state.tokens
    return auth.principal_of(request, tokens)


@router.get("/status", include_in_schema=False)
def status_page(request: Request) -> Response:
    nonce = secrets.token_urlsafe(16)
    principal = _caller(request)
    if principal is None:
        message = "That token is not accepted." if auth.token_of(request) else None
        return _login(nonce, 401, message)
    if principal.is_node:
        return _login(nonce, 403, "A node token cannot open the status page.")
    view = snapshot(request.app.state.fleet, principal)
    page = render.status_page(view, nonce, role=principal.role)
    return HTMLResponse(page, headers=_headers(nonce))


@router.get("/status/data", include_in_schema=False)
def status_json(request: Request) -> Response:
    principal = _caller(request)
    if principal is None:
        return JSONResponse({"error": "authentication required"}, 401)
    if principal.is_node:
        return JSONResponse({"error": "a node token cannot read the status"}, 403)
    doc: dict[str, Any] = snapshot(request.app.state.fleet, principal).to_json()
    return JSONResponse(doc, headers={"Cache-Control": "no-store"})


@router.post("/status/login", include_in_schema=False)
async def login(request: Request) -> Response:
    nonce = secrets.token_urlsafe(16)
    if not auth.same_origin(request):
        return _login(nonce, 403, "The sign-in form was posted from another site.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > auth.MAX_FORM:
            return _login(nonce, 400, "The sign-in form is too large.")
    token = auth.form_token(body)
    tokens: TokenTable = request.app.state.tokens
    principal = tokens.lookup(token)
    if principal is None:
        return _login(nonce, 401, "That token is not accepted.")
    if principal.is_node:
        return _login(nonce, 403, "A node token cannot open the status page.")
    response = RedirectResponse("/status", 303, headers={"Cache-Control": "no-store"})
    auth.set_login(response, token, secure=auth.is_https(request))
    return response


@router.post("/status/logout", include_in_schema=False)
def logout(request: Request) -> Response:
    response = RedirectResponse("/status", 303)
    auth.clear_login(response, secure=auth.is_https(request))
    return response
