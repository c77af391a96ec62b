"""HTTP status for each error of the one tree, and Glance-like error bodies.

Handlers raise :mod:`cowfleet.errors` classes; a ``http_status`` context value
overrides the class default (e.g. 403 for a read-only attribute, 413 for an upload
over the size cap).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    CowfleetError,
    ImageFormatError,
    IntegrityError,
    LocalIOError,
    NotFoundError,
    StorageFullError,
    UsageError,
    ValidationError,
)

_BY_CLASS: tuple[tuple[type[CowfleetError], int], ...] = (
    (ImageFormatError, 415),  # includes UnsafeImageError
    (NotFoundError, 404),
    (ConflictError, 409),
    (ValidationError, 400),
    (UsageError, 400),
    (IntegrityError, 400),
    (StorageFullError, 507),
    (LocalIOError, 500),
    (BackendUnavailableError, 503),
)


def status_for(exc: CowfleetError) -> int:
    explicit = exc.context.get("http_status")
    if isinstance(explicit, int):
        return explicit
    if isinstance(exc, ConflictError) and exc.context.get("reason") in ("protected", "not queued"):
        return 403
    for cls, status in _BY_CLASS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(status: int, message: str) -> dict[str, Any]:
    """``{"code": 404, "title": "Not Found", "message": "..."}``."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {"code": status, "title": title, "message": message}


def forbidden(message: str, **context: Any) -> UsageError:
    return UsageError(message, http_status=403, **context)


def bad_request(message: str, **context: Any) -> ValidationError:
    return ValidationError(message, http_status=400, **context)
