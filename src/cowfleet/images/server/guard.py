"""Limits on request headers, in front of uvicorn's HTTP protocol.

uvicorn's httptools protocol keeps every header byte it is sent until the headers are
complete, with no size limit and no time limit: a few clients sending endless headers
(before any token check is possible) hold as much memory as they like, and a client that
sends nothing, or a byte now and then, holds its connection forever. uvicorn offers
``h11_max_incomplete_event_size`` for its h11 protocol only, and ``timeout_keep_alive``
only between requests, so the limits are kept here, at the asyncio level, by a protocol
that wraps the one uvicorn would use (``uvicorn.Config(http=...)`` accepts a protocol
class) and sees every byte before it does:

- Headers over ``max_header_bytes`` (request line included): the answer is 431 and the
  connection closes; the bytes never reach uvicorn.
- Headers not complete ``header_timeout`` seconds after the connection opened, or after
  the request's first byte: the answer is 408 and the connection closes.

Where a request's headers end is told by a parser of our own (httptools' public
``HttpRequestParser``), fed the same bytes before uvicorn sees them. Headers completed
within a read are measured as parsed; headers still incomplete at the end of a read are
counted as the bytes that read held apart from bodies and complete headers, so that an
endless header is refused after at most one read (256 KiB) past the limit.
The same parser tells the connection's data plane (:mod:`cowfleet.images.server.dataplane`)
how much of a request body has been passed on; once the application takes the socket to
read a large body directly, no more bytes pass here, and the connection closes after that
response.

The inner protocol is built through its public constructor with the keyword arguments
uvicorn gives the class it was configured with (``uvicorn.Config(http=<class>)``), except
that ``app_state`` (the lifespan state each request's ASGI ``state`` is copied from) also
holds the connection's :class:`~cowfleet.images.server.dataplane.DataPlane`, and that
it is given a :class:`~cowfleet.images.server.dataplane.PassThroughTransport`. That pair
is the extension point this module relies on; nothing else of uvicorn is used.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools

from cowfleet.images.server.dataplane import (
    STATE_KEY,
    BodyProgress,
    DataPlane,
    PassThroughTransport,
)

log = logging.getLogger(__name__)

# Bytes of a request line and of a header line beyond what the parser hands over
# (method, version, separators, CRLF).
REQUEST_LINE_EXTRA = 16
HEADER_EXTRA = 4


def _answer(status: int, reason: str, message: str) -> bytes:
    body = (
        '{"code": %d, "title": "%s", "message": "%s"}' % (status, reason, message)  # noqa: UP031
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


class _Boundaries:
    """Callbacks of our own parser: where messages begin, where their headers end, and
    the size of each request's headers once they are complete."""

    def __init__(self, progress: BodyProgress) -> None:
        self.in_headers = True  # a connection starts waiting for a request's headers
        self.size = 0  # bytes of the current request's line and headers, as parsed
        self.progress = progress
        self.reset()

    def reset(self) -> None:
        """Before each read."""
        self.began = False  # a message began during this read
        self.completed = False  # a message's headers completed during this read
        self.body = 0  # body bytes in this read
        self.done = 0  # bytes of the headers completed during this read
        self.largest = 0  # the largest headers completed during this read

    def on_message_begin(self) -> None:
        self.in_headers = True
        self.began = True
        self.size = REQUEST_LINE_EXTRA
        self.progress.messages += 1
        self.progress.in_body = False
        self.progress.body_passed = 0

    def on_url(self, url: bytes) -> None:
        self.size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value) + HEADER_EXTRA

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.completed = True
        self.done += self.size
        self.largest = max(self.largest, self.size)
        self.progress.in_body = True

    def on_body(self, body: bytes) -> None:
        self.body += len(body)
        self.progress.body_passed += len(body)

    def on_message_complete(self) -> None:
        self.progress.in_body = False


class HeaderGuard(asyncio.Protocol):
    """Wraps an HTTP protocol instance; see the module docstring.

    Build the class with :func:`guarded` (uvicorn instantiates it per connection).
    """

    inner_class: type[asyncio.Protocol]
    max_header_bytes: int
    header_timeout: float

    def __init__(self, **kwargs: Any) -> None:
        progress = BodyProgress()
        self.plane: DataPlane | None = None
        app_state = kwargs.get("app_state")
        if isinstance(app_state, dict):
            self.plane = DataPlane(progress)
            kwargs["app_state"] = {**app_state, STATE_KEY: self.plane}
        self.inner: Any = self.inner_class(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._marks = _Boundaries(progress)
        self._parser: Any = httptools.HttpRequestParser(self._marks)
        self._count = 0  # header bytes of the request being received
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._done = False  # refused: nothing more is passed on

    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._arm()
        if self.plane is None:
            self.inner.connection_made(transport)
            return
        self.plane.attach(transport)
        self.inner.connection_made(PassThroughTransport(transport, self.plane))

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self.plane is not None and self.plane.body_taken:
            return  # the application reads the socket; the connection closes after it
        marks = self._marks
        marks.reset()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._marks.progress.broken = True  # not served here; the inner protocol answers
        except httptools.HttpParserError:
            self._parser = None  # the inner protocol answers 400 for the same bytes
            self._marks.progress.broken = True
            self._disarm()
        if self._parser is not None:
            if marks.completed:
                self._count = 0
                if not marks.in_headers:
                    self._disarm()
            if marks.began and marks.in_headers:
                self._arm()  # the time limit runs from the request's first byte
            if marks.in_headers:
                # What this read held apart from bodies and headers already complete.
                self._count += max(0, len(data) - marks.body - marks.done)
            if max(marks.largest, self._count) > self.max_header_bytes:
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    f"request headers larger than {self.max_header_bytes} bytes",
                )
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- limits --------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        assert self._loop is not None
        self._timer = self._loop.call_later(self.header_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._marks.in_headers and not self._done:
            self._refuse(
                408,
                "Request Timeout",
                f"request headers not received within {self.header_timeout:g} s",
            )

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._done = True
        self._disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        peer = transport.get_extra_info("peername")
        log.warning("%s: %s; connection closed", peer, message)
        # Written even when an earlier response on this connection (pipelining) is not
        # finished: that response is cut short by the close anyway.
        transport.write(_answer(status, reason, message))
        transport.close()


def guarded(
    inner_class: type[asyncio.Protocol], *, max_header_bytes: int, header_timeout: float
) -> type[HeaderGuard]:
    """A :class:`HeaderGuard` class around ``inner_class`` with these limits."""
    if max_header_bytes <= 0 or header_timeout <= 0:
        raise ValueError("header limits must be positive")
    return type(
        "GuardedHTTPProtocol",
        (HeaderGuard,),
        {
            "inner_class": inner_class,
            "max_header_bytes": max_header_bytes,
            "header_timeout": header_timeout,
        },
    )
