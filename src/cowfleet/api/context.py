"""Per-request context: who is calling (tokens file) and at which microversion."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from cowfleet.api.faults import ApiFault
from cowfleet.api.microversion import MIN_VERSION, Version
from cowfleet.tokens import Principal, TokenTable


@dataclass(frozen=True)
class Ctx:
    principal: Principal
    token: str
    version: Version

    @property
    def is_admin(self) -> bool:
        return self.principal.is_admin

    @property
    def project(self) -> str:
        return self.principal.project

    def at_least(self, text: str) -> bool:
        return self.version.at_least(text)


def _principal(request: Request) -> tuple[Principal, str]:
    tokens: TokenTable = request.app.state.tokens
    token = request.headers.get("x-auth-token", "")
    principal = tokens.lookup(token)
    if principal is None:
        raise ApiFault(401, "The request you have made requires authentication.")
    return principal, token


def user(request: Request) -> Ctx:
    """A user (admin or member) calling the compute API; node tokens are refused."""
    principal, token = _principal(request)
    if principal.is_node:
        raise ApiFault(403, "A node token is only accepted on /internal routes.")
    version: Version = getattr(request.state, "api_version", MIN_VERSION)
    return Ctx(principal, token, version)


def admin(request: Request) -> Ctx:
    ctx = user(request)
    if not ctx.is_admin:
        raise ApiFault(403, "Policy does not allow this action: it is for admins only.")
    return ctx


def node(request: Request) -> Principal:
    """A node agent calling /internal; only node tokens."""
    principal, _ = _principal(request)
    if not principal.is_node:
        raise ApiFault(403, "Only node tokens are accepted on /internal routes.")
    return principal


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (400 when it is not one, 413 above the size limit)."""
    limit: int = request.app.state.settings.max_body
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiFault(413, f"Request body is too large (limit {limit} bytes).")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        raise ApiFault(400, "Malformed request body: not JSON.") from None
    if not isinstance(body, dict):
        raise ApiFault(400, "Malformed request body: a JSON object is expected.")
    return body


UserCtx = Annotated[Ctx, Depends(user)]
AdminCtx = Annotated[Ctx, Depends(admin)]
NodeCaller = Annotated[Principal, Depends(node)]
JsonBody = Annotated[dict[str, Any], Depends(json_body)]
