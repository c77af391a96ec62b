"""The boundary between httpx and the cowfleet error tree (client side)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    CowfleetError,
    NotFoundError,
    RemoteError,
    TimeoutError_,
    UnsafeImageError,
    UsageError,
    ValidationError,
)

_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
MAX_MESSAGE = 400


def transport_error(exc: httpx.HTTPError, endpoint: str, what: str) -> CowfleetError:
    """Translate an httpx transport failure (no HTTP status) into the tree."""
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError_(f"{what}: image service at {endpoint} timed out ({exc!r})")
    if isinstance(exc, httpx.ConnectError):
        return BackendUnavailableError(
            f"{what}: image service at {endpoint} is unreachable: {exc}", endpoint=endpoint
        )
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return UsageError(f"invalid image service URL {endpoint!r}: {exc}")
    return BackendUnavailableError(
        f"{what}: connection to image service at {endpoint} failed: {exc or type(exc).__name__}",
        endpoint=endpoint,
    )


def server_message(resp: httpx.Response) -> str:
    """The human part of an error body (Glance sends text/HTML, the embedded server JSON)."""
    try:
        text = resp.text
    except (httpx.HTTPError, UnicodeDecodeError):
        return ""
    text = text.strip()
    if text.startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            for key in ("message", "detail", "title"):
                if isinstance(body.get(key), str):
                    return _clean(str(body[key]))
            if isinstance(body.get("detail"), list):
                return json.dumps(body["detail"])[:MAX_MESSAGE]
    return _clean(text)


def _clean(text: str) -> str:
    return _SPACE.sub(" ", _TAGS.sub(" ", text)).strip()[:MAX_MESSAGE]


def raise_for_status(resp: httpx.Response, what: str, **context: Any) -> None:
    """Raise the cowfleet error for a non-2xx response (the body must be read)."""
    status = resp.status_code
    if 200 <= status < 300:
        return
    msg = server_message(resp)
    detail = f"{what}: {msg}" if msg else f"{what}: HTTP {status}"
    ctx: dict[str, Any] = {"status": status, **context}
    if status == 401:
        raise UsageError(
            f"authentication failed at the image service (HTTP 401; is the token right? "
            f"--token-file / COWFLEET_IMAGE_TOKEN): {msg or what}",
            **ctx,
        )
    if status == 403:
        raise UsageError(f"authentication failed or forbidden (HTTP 403): {detail}", **ctx)
    if status == 404:
        raise NotFoundError(detail, **ctx)
    if status == 409:
        raise ConflictError(detail, **ctx)
    if status == 415:
        raise UnsafeImageError(f"image refused (HTTP 415): {detail}", (), **ctx)
    if status == 413:
        raise ValidationError(f"too large (HTTP 413): {detail}", **ctx)
    if status == 416:
        raise ValidationError(f"range not satisfiable (HTTP 416): {detail}", **ctx)
    if 400 <= status < 500:
        raise ValidationError(f"request refused (HTTP {status}): {detail}", **ctx)
    raise RemoteError(f"image service error (HTTP {status}): {detail}", status, **context)
