"""``X-Auth-Token`` check as a plain ASGI middleware (no body buffering, no extra tasks)."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from cowfleet.images.server.errors import error_body

HEADER = b"x-auth-token"
# Paths anyone may read: version discovery and the API description.
OPEN_PATHS = frozenset({"/", "/versions", "/openapi.json"})


class TokenAuth:
    """Answer 401 unless the request carries the expected token."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self._token is None
            or scope.get("path") in OPEN_PATHS
            or self._valid(scope)
        ):
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

    def _valid(self, scope: Scope) -> bool:
        assert self._token is not None
        given = [v for k, v in scope.get("headers", ()) if k == HEADER]
        if len(given) != 1:
            return False
        return hmac.compare_digest(given[0], self._token)
