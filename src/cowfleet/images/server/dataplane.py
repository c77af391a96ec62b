"""The image server's data plane: image bytes between the socket and the application,
through interfaces the project owns.

The HTTP protocol that serves the API is uvicorn's ``HttpToolsProtocol``, built through
its constructor by :class:`~cowfleet.images.server.guard.HeaderGuard`, the protocol class
handed to ``uvicorn.Config(http=...)`` (uvicorn's documented way to choose the protocol).
The guard sees every byte before uvicorn does and owns the connection's asyncio
transport; it gives uvicorn a :class:`PassThroughTransport` in front of it. Per
connection it creates a :class:`DataPlane`, which reaches the application through the
ASGI ``state`` of each request (a copy of the lifespan state that uvicorn's constructor
takes as ``app_state``; see :func:`data_plane_of`). The application stays the one place
that decides (token, visibility, image state, ranges); the data plane only moves bytes:

- **Upload** (:meth:`DataPlane.take_body`): once the application has read the first
  piece of a large body through ASGI ``receive`` (which also answers
  ``Expect: 100-continue``), it asks for the rest. The guard's own parser tells whether
  every body byte passed on to uvicorn has reached the application; if so, reading is
  paused on the transport and the application gets a duplicate of the socket to read
  the rest straight into its buffers (see :mod:`cowfleet.images.server.body`). uvicorn
  never sees those bytes, so the response carries ``Connection: close`` (added by
  :class:`DataPlaneMiddleware`, which uvicorn honours) and the connection ends after it.
- **Download**: :class:`DataPlaneMiddleware` offers the ASGI extension
  ``http.response.zerocopysend``. The response's head and its file bytes are written by
  the data plane (``loop.sendfile``: zero copy on the asyncio loop); uvicorn is then sent
  the same response with an empty body, whose head the :class:`PassThroughTransport`
  drops. uvicorn's bookkeeping stays whole, so the connection is kept alive and
  pipelined requests carry on.

Responses that went this way carry ``x-cowfleet-data-plane`` (``receive`` or
``sendfile``), set only here, so a test can tell that the fast path ran. Under another
server, or without the guard, none of this is offered and the ASGI path gives the same
result.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import os
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Key of the DataPlane in a request's ASGI ``state``.
STATE_KEY = "cowfleet.data_plane"
ZEROCOPY = "http.response.zerocopysend"
# Response header naming the fast path a response took.
MARK_HEADER = b"x-cowfleet-data-plane"


class _Unattached(asyncio.Transport):
    """Stands in before ``connection_made``: closing, so nothing is attempted."""

    def is_closing(self) -> bool:
        return True


_NO_TRANSPORT = _Unattached()


class BodyProgress:
    """What the guard's own parser knows about the request being received."""

    def __init__(self) -> None:
        self.messages = 0  # requests begun on this connection
        self.in_body = False  # headers complete, message not complete
        self.body_passed = 0  # body bytes of this request passed on to uvicorn
        self.broken = False  # our parser gave up on this connection


class DataPlane:
    """One connection's data plane (created by the guard; event-loop thread only)."""

    def __init__(self, progress: BodyProgress) -> None:
        self.progress = progress
        self.transport: asyncio.Transport = _NO_TRANSPORT
        self.body_taken = False  # the application reads the socket: close after this response
        # Requests the application was called for. uvicorn calls it for one request of a
        # connection at a time, in order, so this is the number of the one being served.
        self.requests = 0
        self._swallow: bytearray | None = None  # a head uvicorn writes that is not sent

    def attach(self, transport: asyncio.Transport) -> None:
        """The connection's own transport (from ``connection_made``)."""
        self.transport = transport

    # -- upload -----------------------------------------------------------------
    def take_body(self, received: int) -> int | None:
        """Pause reading and return a duplicate of the socket's descriptor (the caller
        closes it), from which the rest of the request body is to be read.

        ``received``: body bytes the application has had through ASGI ``receive``. None
        when that is not every byte passed on to uvicorn (read more through ASGI first),
        when our parser is already on a later (pipelined) request, or when the connection
        cannot be handed over (TLS, no socket, a parser error).
        """
        progress = self.progress
        if (
            self.body_taken
            or progress.broken
            or progress.messages != self.requests
            or not progress.in_body
            or progress.body_passed != received
            or self.transport.is_closing()
            or self.transport.get_extra_info("sslcontext") is not None
        ):
            return None
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            fd = os.dup(sock.fileno())
        except OSError as exc:
            log.debug("cannot duplicate the connection's socket: %s", exc)
            return None
        self.transport.pause_reading()
        self.body_taken = True
        return fd

    # -- download ---------------------------------------------------------------
    def write_head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        phrase = _phrase(status)
        lines = [f"HTTP/1.1 {status} {phrase}\r\n".encode()]
        lines.append(b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n")
        lines.extend(name + b": " + value + b"\r\n" for name, value in headers)
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))

    async def send_file(self, fileobj: Any, offset: int, count: int) -> int:
        """``count`` bytes of ``fileobj`` from ``offset``; returns the bytes sent."""
        loop = asyncio.get_running_loop()
        sent: int = await loop.sendfile(self.transport, fileobj, offset, count, fallback=True)
        return sent

    def swallow_next_head(self) -> None:
        """Drop the next response head uvicorn writes (this response was written here)."""
        self._swallow = bytearray()

    def filter_write(
        self, data: bytes | bytearray | memoryview
    ) -> bytes | bytearray | memoryview | None:
        """What of uvicorn's ``data`` goes to the socket (None: nothing)."""
        if self._swallow is None:
            return data
        self._swallow += data
        end = self._swallow.find(b"\r\n\r\n")
        if end < 0:
            return None
        rest = bytes(self._swallow[end + 4 :])
        self._swallow = None
        return rest or None

    def reading_given_up(self) -> bool:
        """uvicorn no longer controls reading once the body was taken."""
        return self.body_taken


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


class PassThroughTransport(asyncio.Transport):
    """The transport uvicorn's protocol is given: the connection's own, except that the
    data plane may drop a response head (see :meth:`DataPlane.swallow_next_head`) and
    keeps reading paused once it has taken a request body."""

    def __init__(self, transport: asyncio.Transport, plane: DataPlane) -> None:
        super().__init__()
        self._transport = transport
        self._plane = plane

    def write(self, data: bytes | bytearray | memoryview) -> None:
        out = self._plane.filter_write(data)
        if out:
            self._transport.write(out)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def pause_reading(self) -> None:
        if not self._plane.reading_given_up():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._plane.reading_given_up():
            self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


def data_plane_of(scope: Scope) -> DataPlane | None:
    """The request's connection's data plane, if the server has one."""
    state = scope.get("state")
    plane = state.get(STATE_KEY) if isinstance(state, dict) else None
    return plane if isinstance(plane, DataPlane) else None


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v.lower() for k, v in headers if k.lower() == name]


class DataPlaneMiddleware:
    """ASGI middleware (outermost) completing the data plane, see the module docstring:
    ``Connection: close`` after a taken body, and ``http.response.zerocopysend``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plane = data_plane_of(scope) if scope["type"] == "http" else None
        if plane is None:
            await self.app(scope, receive, send)
            return
        plane.requests += 1
        if scope.get("method") == "GET":
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), ZEROCOPY: {}}}
        await self.app(scope, receive, _Sender(plane, scope, send))


class _Sender:
    """``send`` for one request under the data plane."""

    def __init__(self, plane: DataPlane, scope: Scope, send: Send) -> None:
        self._plane = plane
        self._scope = scope
        self._send = send
        self._start: Message | None = None  # held until the body shows which path
        self._zerocopy = False
        self._status = 200
        self._gone = False  # the connection was ended part-way through the body

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = list(message.get("headers", ()))
            if self._plane.body_taken:
                headers += [(b"connection", b"close"), (MARK_HEADER, b"receive")]
            self._start = {**message, "headers": headers}
            return
        if kind == ZEROCOPY:
            await self._send_file(message)
            return
        if self._start is not None:
            await self._send(self._start)
            self._start = None
        await self._send(message)

    async def _send_file(self, message: Message) -> None:
        plane = self._plane
        if self._start is not None:
            start, self._start = self._start, None
            self._zerocopy = True
            headers = list(start.get("headers", ()))
            if self._closes():
                headers.append((b"connection", b"close"))
            plane.write_head(int(start["status"]), [*headers, (MARK_HEADER, b"sendfile")])
            self._status = int(start["status"])
        if not self._zerocopy:
            raise RuntimeError(f"{ZEROCOPY} after a body sent otherwise")
        count = int(message.get("count") or 0)
        if count and not self._gone:
            offset = int(message.get("offset") or 0)
            try:
                sent = await plane.send_file(message["file"], offset, count)
            except (ConnectionError, OSError) as exc:
                log.info("download ended early: %s", exc)
                sent = -1
            if sent != count:
                if sent >= 0:  # the file shrank under us: the client must not wait
                    log.error("image file ended %d bytes early", count - sent)
                self._gone = True
                plane.transport.abort()
        if not message.get("more_body", False):
            # uvicorn completes the same response with no body; its head is dropped.
            plane.swallow_next_head()
            await self._send(
                {
                    "type": "http.response.start",
                    "status": self._status,
                    "headers": [(b"content-length", b"0")],
                }
            )
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def _closes(self) -> bool:
        """Whether uvicorn will close the connection after this response."""
        tokens = b",".join(_header(self._scope.get("headers", ()), b"connection"))
        return self._scope.get("http_version") == "1.0" or b"close" in tokens
