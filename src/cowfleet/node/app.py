"""The node's HTTP API, for the controller only (docs/fleet-protocol.md, "Controller -> node").

Every route needs ``X-Auth-Token`` equal to the node token (compared in constant
time); anything else is 401. Errors are ``{"error": {"code": N, "message": ...}}``.
Handlers that touch the disk or the driver run in the thread pool, never on the
event loop.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cowfleet.compute.instance import is_uuid
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    CowfleetError,
    NotFoundError,
    UsageError,
    ValidationError,
)
from cowfleet.logs import RequestIdMiddleware
from cowfleet.metrics import MetricsEndpoint, NodeMetrics
from cowfleet.node.builds import Builds
from cowfleet.node.snapshots import Snapshots
from cowfleet.node.spec import BuildSpec

if TYPE_CHECKING:
    from cowfleet.node.precache import Precacher

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


def error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=code)


def _status_of(exc: CowfleetError) -> int:
    if isinstance(exc, (ValidationError, UsageError)):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, BackendUnavailableError):
        return 503
    return 500


def _uuid(uuid: str) -> str:
    if not is_uuid(uuid):
        raise ValidationError(f"invalid server uuid {uuid!r}")
    return uuid


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise _TooLarge(f"request body larger than {MAX_BODY} bytes")
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:
        raise ValidationError(f"request body is not JSON: {exc}") from exc


class _TooLarge(CowfleetError):
    pass


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class TokenGate:
    """Pure ASGI middleware: the node token (constant-time compare), then a body-size cap.

    (Starlette's ``BaseHTTPMiddleware`` costs a task and a queue per request; a build
    burst from the controller should not pay that.)
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: bytes):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        length = b""
        for name, value in scope["headers"]:
            if name == b"x-auth-token":
                given = value
            elif name == b"content-length":
                length = value
        if not hmac.compare_digest(given, self.token):
            response = error(401, "missing or wrong X-Auth-Token (the node token)")
        elif length.isdigit() and int(length) > MAX_BODY:
            response = error(413, f"request body larger than {MAX_BODY} bytes")
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def create_app(
    builds: Builds,
    status: Callable[[], dict[str, Any]],
    token: str,
    precacher: Precacher | None = None,
    snapshots: Snapshots | None = None,
    *,
    metrics: NodeMetrics | None = None,
    metrics_open: bool = False,
    peer_routes: Callable[[FastAPI], None] | None = None,
) -> FastAPI:
    """The node API over ``builds``; ``status`` gives the heartbeat body.

    ``metrics``: served on ``/metrics`` (without the node token when ``metrics_open``);
    ``peer_routes`` adds the routes other nodes fetch bases from (:mod:`cowfleet.node.peers`).
    """
    if not token:
        raise UsageError("the node token is empty")
    expected = token.encode()
    app = FastAPI(title="cowfleet node", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(TokenGate, token=expected)

    @app.exception_handler(CowfleetError)
    async def cowfleet_error(_request: Request, exc: CowfleetError) -> JSONResponse:
        if isinstance(exc, _TooLarge):
            return error(413, str(exc))
        code = _status_of(exc)
        if code >= 500:
            log.error("node API: %s: %s", type(exc).__name__, exc)
        return error(code, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "node API: %s %s: unexpected %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
        )
        log.debug("node API: traceback", exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}")

    @app.put("/v1/servers/{uuid}")
    async def put_server(uuid: str, request: Request) -> JSONResponse:
        spec = BuildSpec.from_json(await _json_body(request), _uuid(uuid))
        view = await run_in_threadpool(builds.put, spec)
        return JSONResponse(view.to_dict(), status_code=202)

    @app.get("/v1/servers/{uuid}")
    async def get_server(uuid: str) -> JSONResponse:
        view = await run_in_threadpool(builds.get, _uuid(uuid))
        return JSONResponse(view.to_dict())

    @app.get("/v1/servers")
    async def list_servers() -> JSONResponse:
        views = await run_in_threadpool(builds.list)
        return JSONResponse({"servers": [v.to_dict() for v in views]})

    @app.delete("/v1/servers/{uuid}")
    async def delete_server(uuid: str) -> Response:
        started = await run_in_threadpool(builds.delete, _uuid(uuid))
        if not started:
            return Response(status_code=204)
        return JSONResponse(
            {"uuid": uuid, "state": "DELETING"},
            status_code=202,
        )

    @app.post("/v1/servers/{uuid}/action")
    async def server_action(uuid: str, request: Request) -> JSONResponse:
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("action"), str):
            raise ValidationError('the body must be {"action": "start"|"stop"|"reboot"}')
        kind = body.get("type", "SOFT")
        if not isinstance(kind, str):
            raise ValidationError("type must be SOFT or HARD")
        view = await run_in_threadpool(builds.action, _uuid(uuid), body["action"], kind.upper())
        return JSONResponse(view.to_dict(), status_code=202)

    @app.post("/v1/servers/{uuid}/snapshot")
    async def start_snapshot(uuid: str, request: Request) -> JSONResponse:
        body = await _json_body(request)
        if snapshots is None:
            raise ValidationError("this node agent takes no snapshots")
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("image_id"), str)
            or not isinstance(body.get("token"), str)
        ):
            raise ValidationError('the body must be {"image_id": "<uuid>", "token": "<token>"}')
        view = await run_in_threadpool(
            snapshots.start, _uuid(uuid), body["image_id"], body["token"]
        )
        return JSONResponse(view.to_dict(), status_code=202)

    @app.get("/v1/servers/{uuid}/snapshot")
    async def get_snapshot(uuid: str) -> JSONResponse:
        if snapshots is None:
            raise NotFoundError("this node agent takes no snapshots")
        return JSONResponse(snapshots.get(_uuid(uuid)).to_dict())

    @app.get("/v1/status")
    async def get_status() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(status))

    if precacher is not None:
        from cowfleet.node.precache import install

        install(app, precacher)
    if metrics is not None:
        app.add_middleware(
            MetricsEndpoint,
            registry=metrics.registry,
            open=metrics_open,
            authorised=lambda given: hmac.compare_digest(given.encode(), expected),
            http=metrics.http,
        )
    if peer_routes is not None:
        peer_routes(app)
    app.add_middleware(RequestIdMiddleware)
    return app
