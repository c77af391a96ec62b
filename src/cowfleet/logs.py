"""Log lines, as text or JSON (the ``log_format`` setting), each naming its request.

A request id travels with a request across the fleet: :class:`RequestIdMiddleware`
takes it from the incoming ``X-Request-Id`` or ``X-OpenStack-Request-Id`` header (or
makes one, ``req-<uuid>`` as Nova does), keeps it in a context variable for the
request's task and threads, answers it in both headers, and logs one access line.
:func:`httpx_hooks` sends it on outgoing calls (compute API -> node agent -> image
service), and :func:`carry` takes it into a thread pool. :class:`RequestIdFilter`
puts it on every log record, so each line of the request names it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import httpx

TEXT, JSON = "text", "json"
FORMATS = (TEXT, JSON)
HEADER = "X-Request-Id"
OPENSTACK_HEADER = "X-OpenStack-Request-Id"
_INCOMING = (b"x-request-id", b"x-openstack-request-id")
# What an incoming id may look like (anything else is replaced by a fresh one, so a
# client cannot put control characters or a megabyte into every log line).
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = logging.getLogger("cowfleet.access")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cowfleet_request_id", default=None
)

T = TypeVar("T")


def new_request_id() -> str:
    return f"req-{uuid.uuid4()}"


def current() -> str | None:
    """The request id of the request being handled here, if any."""
    return _request_id.get()


def bind(request_id: str | None) -> contextvars.Token[str | None]:
    """Make ``request_id`` the current one (undo with :func:`unbind`)."""
    return _request_id.set(request_id)


def unbind(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def accept(value: str | None) -> str:
    """An incoming id when it is well-formed, else a new one."""
    if value and _VALID.match(value):
        return value
    return new_request_id()


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run later (in a pool thread) with the caller's request id."""
    ctx = contextvars.copy_context()

    def run(*args: Any, **kw: Any) -> T:
        return ctx.run(fn, *args, **kw)

    return run


def _add_header(request: httpx.Request) -> None:
    rid = current()
    if rid is not None and HEADER not in request.headers:
        request.headers[HEADER] = rid


def httpx_hooks() -> dict[str, list[Callable[..., Any]]]:
    """``event_hooks=`` for an ``httpx.Client``: send the current request id."""
    return {"request": [_add_header]}


# -- records and formats ----------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (the current id, or None) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current()
        return True


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``, with ``[req-...]`` when the line belongs to a request."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [{rid}]" if rid else line


# LogRecord attributes that are not "extra" fields a caller passed.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the fields a
    caller passed with ``extra=``, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "process": record.process,
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(level: int, fmt: str = TEXT, stream: Any = None) -> None:
    """Log to stderr in ``fmt`` at ``level``, each line with its request id.

    Like :func:`logging.basicConfig`, this leaves a root logger that someone else
    configured (a test runner's capture) alone; calling it again replaces its own handler.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "cowfleet", False)]
    if len(ours) != len(root.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == JSON else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.cowfleet = True  # type: ignore[attr-defined]
    for old in ours:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# -- the middleware ---------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestIdMiddleware:
    """Pure ASGI middleware: the request id (see the module docstring) and an access line
    (``cowfleet.access`` at INFO: method, path, status, seconds)."""

    def __init__(self, app: ASGIApp, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.monotonic = monotonic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name in _INCOMING:
                given = value.decode("latin-1")
                if name == _INCOMING[0]:
                    break
        rid = accept(given)
        token = bind(rid)
        started = self.monotonic()
        status = 500
        extra = [
            (HEADER.lower().encode(), rid.encode()),
            (OPENSTACK_HEADER.lower().encode(), rid.encode()),
        ]

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope.get("path") != "/metrics":  # scraped every few seconds: not news
                access_log.info(
                    "%s %s %d %.3fs",
                    scope["method"],
                    scope.get("path", ""),
                    status,
                    self.monotonic() - started,
                    extra={"status": status},
                )
            unbind(token)
