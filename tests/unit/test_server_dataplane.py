"""The image server's data plane in process: the guard protocol on a real asyncio socket
transport with a recording inner protocol (no HTTP server), and the ASGI middleware."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from cowfleet.images.server.dataplane import (
    STATE_KEY,
    BodyProgress,
    DataPlane,
    DataPlaneMiddleware,
    PassThroughTransport,
)
from cowfleet.images.server.guard import guarded


class Inner(asyncio.Protocol):
    """Records what the guard passes on (as uvicorn's protocol would get it)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.data = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


HEAD = b"PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Length: 3000000\r\n\r\n"


async def settle(proto: Any, want: int) -> None:
    for _ in range(200):
        if len(proto.inner.data) >= want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(proto.inner.data)} of {want} bytes passed on")


def test_the_body_is_handed_over_only_once_the_application_has_every_byte_passed_on() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        cls = guarded(Inner, max_header_bytes=8192, header_timeout=60)
        state = {"lifespan": 1}
        transport, proto = await loop.create_connection(
            lambda: cls(config=None, app_state=state), sock=ours
        )
        plane = proto.inner.kwargs["app_state"][STATE_KEY]
        assert isinstance(plane, DataPlane)
        assert proto.inner.kwargs["app_state"]["lifespan"] == 1 and STATE_KEY not in state
        assert isinstance(proto.inner.transport, PassThroughTransport)

        theirs.sendall(HEAD + b"a" * 1000)
        await settle(proto, len(HEAD) + 1000)
        assert plane.take_body(received=1000) is None  # the application has no request yet
        plane.requests += 1  # as the middleware counts the request it is called for
        assert plane.take_body(received=600) is None  # uvicorn holds 400 bytes unread
        fd = plane.take_body(received=1000)
        assert fd is not None
        try:
            assert not transport.is_reading()
            proto.inner.transport.resume_reading()  # uvicorn no longer decides that
            assert not transport.is_reading()
            theirs.sendall(b"b" * 5000)
            await asyncio.sleep(0.05)
            os.set_blocking(fd, True)
            assert os.read(fd, 10000) == b"b" * 5000  # straight from the socket
            assert proto.inner.data == HEAD + b"a" * 1000  # and not through uvicorn
            assert plane.take_body(received=1000) is None  # once per connection
        finally:
            os.close(fd)
        transport.close()
        theirs.close()

    asyncio.run(run())


def test_no_handover_outside_a_body_or_after_a_parse_error() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        cls = guarded(Inner, max_header_bytes=8192, header_timeout=60)
        for sent, received in (
            (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 0),  # complete, no body
            (HEAD[:20], 0),  # headers not complete
            (b"PUT /x HTTP/1.1\r\nContent-Length: 9\r\n\r\n123456789", 9),  # body complete
            (b"\x00\x01 not http\r\n\r\n", 0),  # our parser gave up
        ):
            ours, theirs = socket.socketpair()
            transport, proto = await loop.create_connection(
                lambda: cls(config=None, app_state={}), sock=ours
            )
            theirs.sendall(sent)
            await settle(proto, len(sent))
            plane = proto.inner.kwargs["app_state"][STATE_KEY]
            plane.requests = 1
            assert plane.take_body(received=received) is None, sent
            transport.close()
            theirs.close()

    asyncio.run(run())


def test_no_handover_while_our_parser_is_on_a_later_pipelined_request() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        cls = guarded(Inner, max_header_bytes=8192, header_timeout=60)
        ours, theirs = socket.socketpair()
        transport, proto = await loop.create_connection(
            lambda: cls(config=None, app_state={}), sock=ours
        )
        # The application is still on the first request (it has had 500 of its 1000
        # bytes) when the rest of it and 500 bytes of a second one have been passed on.
        first = b"PUT /a HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"a" * 1000
        theirs.sendall(first + HEAD + b"b" * 500)
        await settle(proto, len(first) + len(HEAD) + 500)
        plane = proto.inner.kwargs["app_state"][STATE_KEY]
        plane.requests = 1
        assert plane.take_body(received=500) is None
        plane.requests = 2  # on the second request, with every byte passed on received
        fd = plane.take_body(received=500)
        assert fd is not None
        os.close(fd)
        transport.close()
        theirs.close()

    asyncio.run(run())


def test_a_head_written_here_replaces_uvicorns_even_when_split() -> None:
    plane = DataPlane(BodyProgress())
    assert plane.filter_write(b"HTTP/1.1 200 OK\r\n") == b"HTTP/1.1 200 OK\r\n"
    plane.swallow_next_head()
    assert plane.filter_write(b"HTTP/1.1 200 OK\r\ncontent-") is None
    assert plane.filter_write(b"length: 0\r\n\r\n") is None
    assert plane.filter_write(b"HTTP/1.1 404 ") == b"HTTP/1.1 404 "  # the next response


def test_the_middleware_closes_after_a_taken_body_and_is_inert_without_a_plane() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert ("http.response.zerocopysend" in scope.get("extensions", {})) == (
            scope["method"] == "GET" and STATE_KEY in scope.get("state", {})
        )
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run(scope: Any) -> list[Any]:
        sent: list[Any] = []

        async def send(msg: Any) -> None:
            sent.append(msg)

        async def receive() -> Any:
            return {"type": "http.disconnect"}

        await DataPlaneMiddleware(app)(scope, receive, send)
        return sent

    plane = DataPlane(BodyProgress())
    put = {"type": "http", "method": "PUT", "headers": [], "state": {STATE_KEY: plane}}
    assert asyncio.run(run(put))[0]["headers"] == []
    plane.body_taken = True
    assert asyncio.run(run(put))[0]["headers"] == [
        (b"connection", b"close"),
        (b"x-cowfleet-data-plane", b"receive"),
    ]
    for scope in ({"type": "http", "method": "GET", "headers": []}, {**put, "method": "GET"}):
        assert asyncio.run(run(scope))[1]["type"] == "http.response.body"
