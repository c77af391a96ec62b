"""The application factory: ``create_app(settings) -> FastAPI``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from cowfleet import __version__
from cowfleet.errors import CowfleetError, UnsafeImageError
from cowfleet.images.server.api import Service, router
from cowfleet.images.server.auth import TokenAuth
from cowfleet.images.server.catalog import Catalog
from cowfleet.images.server.dataplane import DataPlaneMiddleware
from cowfleet.images.server.errors import error_body, status_for
from cowfleet.images.server.members import router as members_router
from cowfleet.images.server.settings import ServerSettings
from cowfleet.images.server.slots import UploadSlots
from cowfleet.images.server.store import FilesystemStore
from cowfleet.images.server.upload import BlockPool
from cowfleet.logs import RequestIdMiddleware
from cowfleet.metrics import ImageMetrics, MetricsEndpoint

log = logging.getLogger(__name__)


def create_app(settings: ServerSettings, *, catalog: Catalog | None = None) -> FastAPI:
    """Build the app: open (and migrate) the catalog, tidy the store after a crash (staging
    leftovers, and image files no active image explains once ``orphan_grace`` old)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = FilesystemStore(
        settings.images_dir,
        settings.staging_dir,
        direct_io=settings.direct_io,
        # Buffered uploads stay out of the page cache too when downloads never keep it.
        drop_behind=settings.cache_min_uses == 0,
    )
    store.clean_staging()
    catalog = catalog or Catalog.open(settings.database_url)
    catalog.reset_saving()
    store.reconcile(catalog.active_ids(), grace=settings.orphan_grace)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            catalog.close()

    app = FastAPI(
        title="cowfleet image service",
        version=__version__,
        description="A Glance v2-compatible subset: images, their data, JSON-patch updates.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = Service(
        settings,
        catalog,
        store,
        BlockPool(settings.upload_block),
        UploadSlots(settings.max_uploads, settings.max_uploads_per_token),
    )
    app.include_router(router)
    app.include_router(members_router)

    metrics = app.state.metrics = ImageMetrics()

    @app.exception_handler(CowfleetError)
    async def _cowfleet_error(_req: Request, exc: CowfleetError) -> JSONResponse:
        if isinstance(exc, UnsafeImageError):
            metrics.upload_refused(exc.failures)
        status = status_for(exc)
        if status >= 500:
            log.error("request failed: %s", exc)
        headers = exc.context.get("headers")
        return JSONResponse(
            error_body(status, str(exc)),
            status_code=status,
            headers=headers if isinstance(headers, dict) else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(error_body(400, "; ".join(parts) or "invalid request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; list them all.
            headers["Allow"] = ", ".join(sorted(allowed_methods(req)))
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=headers,
        )

    app.add_middleware(TokenAuth, token=settings.token, tokens=settings.tokens)
    # /metrics answers before the token check (its own rule: cowfleet.metrics).
    app.add_middleware(
        MetricsEndpoint,
        registry=metrics.registry,
        open=settings.metrics_open,
        authorised=TokenAuth(app, settings.token, settings.tokens).accepts,
        http=metrics.http,
    )
    app.add_middleware(RequestIdMiddleware)
    # Outermost: sees every response, the 401s included (a no-op without a data plane).
    app.add_middleware(DataPlaneMiddleware)
    return app


def allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return methods
