"""The boundary between httpx and the cowfleet error tree (client side).

:func:`send` is the one place the image client puts a request on the wire. A
request that went out on a kept-alive connection the server had already closed
(reset, or closed before any byte of an answer: a server's idle timeout racing
the reuse, or uWSGI's ``http-socket`` mode, which closes after every answer
without saying so) is sent again on another connection when that is safe
(RFC 9112 section 9.3.1): the method is idempotent and the body can be sent
again (bytes, or a body whose ``rewind()`` says it started over). A request
that fails on a connection opened for it is not sent again, nor is a POST.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
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

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# Each retry takes the next idle pooled connection or opens one; a failure on a
# connection opened for the request ends it. The cap also covers a transport that
# reports no connection events (it looks like reuse every time).
STALE_RETRIES = 3
# What httpx raises when a connection dies before the answer's headers arrived:
# reset (ReadError, WriteError) or closed without a byte (RemoteProtocolError,
# "Server disconnected without sending a response").
_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

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


class _ConnectionWatch:
    """An httpx ``trace`` extension: did this attempt open a connection of its own?"""

    def __init__(self) -> None:
        self.opened = False

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.startswith(("connection.connect_tcp.", "connection.connect_unix_socket.")):
            self.opened = True


def send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    what: str,
    endpoint: str,
    stream: bool = False,
    rewind: Callable[[], bool] | None = None,
    extensions: dict[str, Any] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Send ``client.build_request(method, url, **kwargs)`` and return its response
    (read, or open when ``stream``; any status); httpx errors become cowfleet errors.

    A request dropped on a reused connection before its answer began is sent again
    (see the module doc). ``rewind`` is called before a body that is not plain bytes
    is sent again; it returns False when the body cannot start over. ``extensions``
    go to the transport with the request (see :mod:`.transport`).
    """
    method = method.upper()
    attempt = 0
    while True:
        watch = _ConnectionWatch()
        try:
            request = client.build_request(
                method, url, extensions={**(extensions or {}), "trace": watch}, **kwargs
            )
            # Judged before sending: reading a body can swap it for bytes (request.read()).
            plain = rewind is None and isinstance(request.stream, httpx.ByteStream)
            try:
                resp = client.send(request, stream=True)
            except _DROPPED as exc:
                if not _may_resend(method, plain, watch, attempt, rewind):
                    raise
                attempt += 1
                log.info(
                    "%s: %s %s dropped on a kept-alive connection before any answer (%s); "
                    "sending it again on another connection",
                    what,
                    method,
                    request.url.path,
                    exc or type(exc).__name__,
                )
                continue
            if not stream:
                try:
                    resp.read()
                finally:
                    resp.close()
            return resp
        except httpx.HTTPError as exc:
            raise transport_error(exc, endpoint, what) from exc


def _may_resend(
    method: str,
    plain: bool,
    watch: _ConnectionWatch,
    attempt: int,
    rewind: Callable[[], bool] | None,
) -> bool:
    if method not in IDEMPOTENT_METHODS or watch.opened or attempt >= STALE_RETRIES:
        return False
    if plain:
        return True  # bytes (or no body): the same bytes go out again
    return rewind is not None and rewind()


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
