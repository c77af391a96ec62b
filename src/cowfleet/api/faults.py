"""Errors in Nova's fault shape: ``{"itemNotFound": {"code": 404, "message": "..."}}``.

Every error the compute API answers goes through :func:`fault_response`, including
FastAPI's own (unknown route, wrong method, validation) and unexpected exceptions,
so clients that read ``body[first key]["message"]`` always find one.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cowfleet.errors import BackendUnavailableError, ConflictError, NotFoundError, UsageError

log = logging.getLogger(__name__)

FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    429: "overLimit",
    501: "notImplemented",
    503: "serviceUnavailable",
}


class ApiFault(Exception):
    """An error answered to the client with ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fault_name(code: int) -> str:
    return FAULT_NAMES.get(code, "computeFault")


def fault_body(code: int, message: str) -> dict[str, Any]:
    return {fault_name(code): {"code": code, "message": message}}


def fault_response(code: int, message: str, *, internal: bool = False) -> JSONResponse:
    """The error answer; ``internal`` routes use the fleet protocol's ``{"error": ...}``."""
    headers = {"WWW-Authenticate": 'Token realm="cowfleet"'} if code == 401 else None
    body = {"error": {"code": code, "message": message}} if internal else fault_body(code, message)
    return JSONResponse(body, status_code=code, headers=headers)


def _respond(request: Request, code: int, message: str) -> JSONResponse:
    return fault_response(code, message, internal=request.url.path.startswith("/internal/"))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return "Invalid input for the request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a Nova fault."""

    @app.exception_handler(ApiFault)
    async def _fault(request: Request, exc: ApiFault) -> JSONResponse:
        return _respond(request, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _respond(request, 404, "The resource could not be found.")
        if exc.status_code == 405:
            return _respond(request, 405, "The method is not allowed for this resource.")
        return _respond(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(request, 400, _validation_message(exc))

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return _respond(request, 404, exc.message)

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return _respond(request, 409, exc.message)

    @app.exception_handler(UsageError)
    async def _usage(request: Request, exc: UsageError) -> JSONResponse:
        return _respond(request, 400, exc.message)

    @app.exception_handler(BackendUnavailableError)
    async def _unavailable(request: Request, exc: BackendUnavailableError) -> JSONResponse:
        log.warning("backend unavailable: %s", exc)
        return _respond(request, 503, exc.message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s", exc)
        log.debug("traceback", exc_info=exc)
        return _respond(request, 500, "Unexpected API Error. The server could not process it.")
