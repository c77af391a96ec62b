"""The compute API's ASGI application: ``create_app(settings)``.

Routes live in :mod:`cowfleet.api.routes`; this module wires them under ``/v2.1``,
serves the version documents, checks microversions and body sizes before any route
runs (:class:`Microversions`), seeds the flavors, and runs the periodic sweep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cowfleet.api import faults, microversion, snapshots
from cowfleet.api.db.engine import Database
from cowfleet.api.db.models import FlavorRow, NodeRow
from cowfleet.api.fleet import Fleet
from cowfleet.api.images import ImageLookup
from cowfleet.api.nodes_client import NodesClient
from cowfleet.api.precache import Precaches
from cowfleet.api.routes import aggregates, flavors, hypervisors, internal, servers, whoami
from cowfleet.api.routes import precache as precache_routes
from cowfleet.api.settings import ApiSettings
from cowfleet.api.status import routes as status_routes
from cowfleet.api.versions import version_doc, versions_doc
from cowfleet.compute.flavors import BUILTIN, Flavor
from cowfleet.errors import ConfigError
from cowfleet.logs import RequestIdMiddleware
from cowfleet.metrics import ApiMetrics, MetricsEndpoint
from cowfleet.tokens import TokenTable

log = logging.getLogger(__name__)

PREFIX = "/v2.1"
# Nova's classic ids for the m1 flavors; other flavors use their name as id.
CLASSIC_IDS = {"m1.tiny": "1", "m1.small": "2", "m1.medium": "3", "m1.large": "4", "m1.xlarge": "5"}


class Microversions:
    """ASGI middleware: the requested microversion (400/406 faults), the response
    headers that name it, and the 413 for a declared body over the limit."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        length = next((v for k, v in headers if k == "content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body:
            internal = path.startswith("/internal/")
            await faults.fault_response(
                413,
                f"Request body is too large (limit {self.max_body} bytes).",
                internal=internal,
            )(scope, receive, send)
            return
        versioned = path.startswith(PREFIX + "/") and path != PREFIX + "/"
        if not versioned:
            await self.app(scope, receive, send)
            return
        try:
            version = microversion.requested(
                [v for k, v in headers if k == microversion.HEADER.lower()],
                [v for k, v in headers if k == microversion.LEGACY_HEADER.lower()],
            )
        except microversion.UnsupportedVersion as exc:
            await faults.fault_response(406, exc.message)(scope, receive, send)
            return
        except microversion.MalformedVersion as exc:
            await faults.fault_response(400, exc.message)(scope, receive, send)
            return
        scope.setdefault("state", {})["api_version"] = version
        extra = microversion.response_headers(version)

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_version)


def seed_flavors(db: Database, extra: tuple[Flavor, ...] = ()) -> None:
    """Add the built-in (and configured) flavors missing from the database."""
    wanted = {f.name: f for f in (*BUILTIN, *extra)}
    with db.read() as s:
        have = set(s.scalars(select(FlavorRow.name)))
    for flavor in wanted.values():
        if flavor.name in have:
            continue
        try:
            with db.write() as s:
                s.add(
                    FlavorRow(
                        id=CLASSIC_IDS.get(flavor.name, flavor.name),
                        name=flavor.name,
                        vcpus=flavor.vcpus,
                        ram_mb=flavor.ram_mb,
                        root_gb=flavor.root_gb,
                        ephemeral_gb=flavor.ephemeral_gb,
                        swap_mb=flavor.swap_mb,
                        is_public=True,
                        description=None,
                        extra_specs={},
                    )
                )
        except IntegrityError:  # another replica seeded it first
            pass


def create_app(
    settings: ApiSettings,
    tokens: TokenTable,
    *,
    db: Database | None = None,
    flavors_extra: tuple[Flavor, ...] = (),
    sweep: bool = True,
    images: ImageLookup | None = None,
    nodes: NodesClient | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The application; opens (and migrates) the database unless ``db`` is given.

    ``images`` and ``nodes`` (the image service lookup and the node agents' client)
    and ``clock`` may be passed in (tests); by default they are built from ``settings``.
    """
    node_token = tokens.first("node")
    if node_token is None:
        raise ConfigError(
            f'tokens file {tokens.source} has no role = "node" token: '
            "the API needs one to talk to node agents"
        )
    database = db or Database.open(settings.database_url)
    seed_flavors(database, flavors_extra)
    fleet = Fleet(
        database,
        settings,
        images or ImageLookup(settings.image_url),
        nodes or NodesClient(node_token, timeout=settings.node_timeout),
        clock=clock,
    )
    precaches = Precaches(fleet)
    stop = threading.Event()
    # Deletes the image of a snapshot taken over after a restart (its caller's token is gone).
    snapshot_token = tokens.first("admin")

    def sweeper() -> None:
        while not stop.wait(settings.heartbeat_interval):
            try:
                fleet.sweep()
                precaches.sweep()
                snapshots.recover(fleet, snapshot_token)
            except Exception as exc:  # keep sweeping; the next pass retries
                log.error("sweep failed: %s", exc)
                log.debug("traceback", exc_info=True)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=sweeper, name="sweep", daemon=True)
        if sweep:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            fleet.close()

    app = FastAPI(
        title="cowfleet compute API",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tokens = tokens
    app.state.fleet = fleet
    app.state.precaches = precaches
    faults.install(app)

    def _root_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.get("/", include_in_schema=False)
    def root(request: Request) -> JSONResponse:
        return JSONResponse(versions_doc(_root_url(request)))

    @app.get(PREFIX, include_in_schema=False)
    @app.get(PREFIX + "/", include_in_schema=False)
    def v21(request: Request) -> JSONResponse:
        return JSONResponse({"version": version_doc(_root_url(request))})

    for module in (servers, flavors, hypervisors, aggregates):
        app.include_router(module.router, prefix=PREFIX)
    app.include_router(precache_routes.router, prefix=PREFIX)
    app.include_router(internal.router)
    app.include_router(precache_routes.internal_router)
    app.include_router(status_routes.router)
    app.include_router(whoami.router)
    app.add_middleware(Microversions, max_body=settings.max_body)
    metrics = ApiMetrics(_heartbeats(database), clock)
    fleet.metrics = app.state.metrics = metrics
    app.add_middleware(
        MetricsEndpoint,
        registry=metrics.registry,
        open=settings.metrics_open,
        authorised=lambda token: tokens.lookup(token) is not None,
        http=metrics.http,
    )
    app.add_middleware(RequestIdMiddleware)
    return app


def _heartbeats(db: Database) -> Callable[[], list[tuple[str, float]]]:
    """Each node's hostname and last heartbeat time, read when Prometheus scrapes."""

    def read() -> list[tuple[str, float]]:
        with db.read() as s:
            rows = s.execute(select(NodeRow.hostname, NodeRow.last_heartbeat)).all()
        return [(str(h), float(t)) for h, t in rows]

    return read
