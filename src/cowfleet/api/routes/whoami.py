"""``GET /internal/whoami``: the role and project a token speaks for (any known token).

``cowfleet doctor`` calls it with a node's token to tell "unknown token" (401) from
"known, but not a node token" without changing anything, and reads the clock skew
from the answer's ``Date`` header.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from cowfleet.api.faults import ApiFault
from cowfleet.tokens import TokenTable

router = APIRouter()


@router.get("/internal/whoami")
def whoami(request: Request) -> dict[str, Any]:
    tokens: TokenTable = request.app.state.tokens
    principal = tokens.lookup(request.headers.get("x-auth-token", ""))
    if principal is None:
        raise ApiFault(401, "The request you have made requires authentication.")
    return {"role": principal.role, "project": principal.project}
