"""Receiving an upload body into the pipeline: straight from the socket when the server
allows it, else as ASGI messages.

Under uvicorn's httptools protocol every piece of a request body (what one ``recv``
returned) is copied twice more on its way to the application (``bytearray +=``, then
``bytes(...)``) into freshly allocated memory, and each piece wakes the event loop:
1.25-1.4 CPU-s per GiB here, as much as one of the two hashes. For a large body with a
Content-Length none of that is needed. After the first piece (``receive()`` also
answers ``Expect: 100-continue``) the connection's data plane
(:mod:`cowfleet.images.server.dataplane`, the project's own protocol in front of
uvicorn's) pauses reading and hands over the socket, and a receiver thread reads the
rest with ``readv`` from a duplicate of it, straight into the pipeline's blocks: one
copy, no allocation, no event-loop round trip per piece.

uvicorn's HTTP parser never sees those bytes, so the connection closes after the
response (the data plane adds ``Connection: close``); a client opens a new one for its
next request. Before that close, what the client sent beyond the body (a pipelined
request, which a client retries on a new connection) is read and dropped, and after a
failure part-way through, so is the rest of the body (for at most :data:`LINGER`
seconds): a socket closed with unread data sends a reset, and the client could lose the
answer. Without a data plane (another server, tests in process), TLS, a chunked body,
or a body under :data:`DIRECT_MIN` the ASGI path gives the same result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from cowfleet.images.server.dataplane import DataPlane, data_plane_of
from cowfleet.images.server.upload import UploadPipeline

log = logging.getLogger(__name__)

# Bodies with less than this left after the first piece take the ASGI path (no thread,
# and the connection stays open).
DIRECT_MIN = 1024 * 1024
# Longest wait for data before the receiver thread looks at its stop flag again (s).
POLL_SLICE = 0.25
# After a failure part-way through a body, the rest is read and dropped for at most this
# long (s), so that the client gets the error answer: closing a socket with unread data
# sends a reset, which can destroy the answer before the client reads it.
LINGER = 2.0


async def receive_body(request: Request, pipe: UploadPipeline, idle_timeout: float) -> bool:
    """Put every byte of the request body into ``pipe``.

    Returns True when the rest of the body was read from the socket directly (the
    connection then closes after the response). Raises ``ClientDisconnect`` when the
    client goes away and ``TimeoutError`` when it sends nothing for ``idle_timeout``
    seconds.
    """
    loop = asyncio.get_running_loop()
    length = _declared_length(request)
    plane = data_plane_of(request.scope)
    conn: _Connection | None = None
    async with asyncio.timeout(idle_timeout) as idle:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            await pipe.feed(message.get("body", b""))
            if not message.get("more_body", False):
                return False
            idle.reschedule(loop.time() + idle_timeout)
            if length is not None and plane is not None:
                # None also while uvicorn holds body bytes not yet received: ask again.
                conn = _take_over(plane, pipe.total, length - pipe.total)
                if conn is not None:
                    break
    # Outside the asyncio timeout: the receiver thread keeps its own idle deadline.
    await conn.read_rest(pipe, idle_timeout)
    return True


def _declared_length(request: Request) -> int | None:
    """Content-Length of a body that is not chunked, else None."""
    if "transfer-encoding" in request.headers:
        return None
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


@dataclass
class _Connection:
    """The socket of a connection whose reading uvicorn has handed over."""

    fd: int  # our own duplicate: closing it leaves uvicorn's descriptor alone
    remaining: int

    async def read_rest(self, pipe: UploadPipeline, idle_timeout: float) -> None:
        stop = threading.Event()
        reader = _SocketReader(self.fd, idle_timeout, stop)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="cowfleet-recv") as thread:
                future = thread.submit(self._receive, pipe, reader)
                try:
                    await asyncio.wrap_future(future)
                except asyncio.CancelledError:
                    # The request is being torn down: the thread must let go of the
                    # pipeline before the caller aborts it (it checks every POLL_SLICE).
                    stop.set()
                    concurrent.futures.wait([future])
                    raise
        finally:
            os.close(self.fd)

    def _receive(self, pipe: UploadPipeline, reader: _SocketReader) -> None:
        """In the receiver thread: the rest of the body into ``pipe``."""
        start = pipe.total
        try:
            pipe.fill(reader.read_into, self.remaining)
        except (ClientDisconnect, TimeoutError):
            raise  # nothing more is coming
        except Exception:
            left = self.remaining - (pipe.total - start)
            reader.discard(left, LINGER)
            raise
        reader.discard(DIRECT_MIN, 0.0)  # a pipelined request: only what is there


def _take_over(plane: DataPlane, received: int, remaining: int) -> _Connection | None:
    """The socket from the connection's data plane, or None where that is not possible."""
    if remaining < DIRECT_MIN:
        return None
    fd = plane.take_body(received)
    if fd is None:
        return None
    log.debug("reading the last %d bytes of the body from the socket", remaining)
    return _Connection(fd, remaining)


class _SocketReader:
    """``read_into`` for :meth:`UploadPipeline.fill` over a non-blocking socket."""

    def __init__(self, fd: int, idle_timeout: float, stop: threading.Event) -> None:
        self._fd = fd
        self._idle_timeout = idle_timeout
        self._stop = stop
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read_into(self, buf: memoryview) -> int:
        deadline = time.monotonic() + self._idle_timeout
        while True:
            try:
                n = os.readv(self._fd, [buf])
            except BlockingIOError:
                n = -1
            except OSError as exc:  # reset by the peer and the like
                raise ClientDisconnect() from exc
            if n > 0:
                return n
            if n == 0:
                raise ClientDisconnect()
            if self._stop.is_set():
                raise ClientDisconnect()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no data for {self._idle_timeout}s")
            with contextlib.suppress(InterruptedError):
                self._poll.poll(min(left, POLL_SLICE) * 1000)

    def discard(self, limit: int, seconds: float) -> int:
        """Read and drop up to ``limit`` bytes, waiting at most ``seconds`` in all for
        them (0: only what has arrived). Never raises; returns the bytes dropped."""
        deadline = time.monotonic() + seconds
        scratch = memoryview(bytearray(min(limit, DIRECT_MIN)))
        dropped = 0
        while dropped < limit:
            try:
                n = os.readv(self._fd, [scratch[: limit - dropped]])
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    break
                with contextlib.suppress(InterruptedError):
                    self._poll.poll(min(left, POLL_SLICE) * 1000)
                continue
            except OSError:
                break
            if n == 0:
                break
            dropped += n
        if dropped:
            log.debug("dropped %d bytes the client sent beyond what was used", dropped)
        return dropped
