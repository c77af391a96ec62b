"""``X-Auth-Token`` check as a plain ASGI middleware (no body buffering, no extra tasks).

Two modes: the single token of the token file (its holder is an admin of no project,
:data:`~.access.SINGLE_TOKEN_ADMIN`), or the shared tokens file, where each token
speaks for a project in a role. The request's :class:`~.access.Caller` is left in the
ASGI scope's ``state`` (``request.state.caller``) for the routes' visibility checks.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from cowfleet.images.server.access import SINGLE_TOKEN_ADMIN, Caller
from cowfleet.images.server.errors import error_body
from cowfleet.tokens import TokenTable

HEADER = b"x-auth-token"
# Paths anyone may read: version discovery and the API description.
OPEN_PATHS = frozenset({"/", "/versions", "/openapi.json"})


class TokenAuth:
    """Answer 401 unless the request carries the expected token, or (with ``tokens``)
    one of the tokens file's. ``token`` and ``tokens`` both None: no check."""

    def __init__(self, app: ASGIApp, token: str | None, tokens: TokenTable | None = None) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        caller = self._caller(scope)
        if caller is not None:
            scope.setdefault("state", {})["caller"] = caller
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            error_body(401, "authentication required: send a valid X-Auth-Token header")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Token realm="cowfleet"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def accepts(self, token: str) -> bool:
        """Whether ``token`` passes this check (``/metrics`` asks, see cowfleet.metrics)."""
        return self._caller({"headers": [(HEADER, token.encode("latin-1"))]}) is not None

    def _caller(self, scope: Scope) -> Caller | None:
        if self._tokens is None and self._token is None:
            return SINGLE_TOKEN_ADMIN
        given = [v for k, v in scope.get("headers", ()) if k == HEADER]
        if len(given) != 1:
            return None
        if self._tokens is not None:
            principal = self._tokens.lookup(given[0].decode("latin-1"))
            return None if principal is None else Caller.of(principal)
        assert self._token is not None
        return SINGLE_TOKEN_ADMIN if hmac.compare_digest(given[0], self._token) else None
