"""A data-plane transport for image bodies, plugged into httpx through its public API.

Why: httpx's default transport (httpcore + h11) delivers a body in 64 KiB events that
Python then joins; on this class of machine that tops out near 370 MiB/s on loopback,
below what sha512 and the page cache sustain, so it would be the bottleneck of a fetch.
``http.client`` reads a whole multi-MiB chunk with one ``readinto`` (over 1 GB/s here).

:class:`DataTransport` is an :class:`httpx.BaseTransport`: the image client hands it to
its ``httpx.Client`` objects (``transport=``) for GET requests, so requests still go
through :func:`cowfleet.images.http.send` (same headers, timeouts, error translation,
trace events). It takes the TLS context the client uses for everything else, keeps a
few idle connections whose last answer was read to the end (HTTP/1.1 keep-alive; a
request that a stale one drops is sent again by ``send``, which sees from the trace that
no connection was opened), and reads the body into the caller's reused buffers when the
request carries a :class:`~cowfleet.fetch.buffers.BufferPool` in its
``cowfleet.buffers`` extension. Methods other than GET go to ``fallback`` (httpx's own
transport, created on first use: a process that only reads, such as ``cowfleet cache
fetch``, never imports httpcore). The image client does not use it when a proxy
applies to the endpoint (httpx's proxy support then).
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from cowfleet.fetch.buffers import EXTENSION, BufferPool

DEFAULT_CHUNK = 1 << 20
MAX_IDLE = 8  # idle connections kept for reuse
_Trace = Callable[[str, dict[str, Any]], None]
_Origin = tuple[str, str, int]


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None]:
    t = request.extensions.get("timeout") or {}
    return t.get("connect"), t.get("read")


class _Body(httpx.SyncByteStream):
    """The response body: whole chunks read with ``readinto``."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        sock: socket.socket | None,
        resp: http.client.HTTPResponse,
        request: httpx.Request,
        pool: BufferPool | None,
        release: Callable[[http.client.HTTPConnection], None] | None = None,
    ) -> None:
        self._conn = conn
        self._sock = sock
        self._resp = resp
        self._request = request
        self._pool = pool
        self._release = release
        self._failed = False

    def _buffer(self) -> bytearray:
        if self._pool is not None:
            return self._pool.take()
        length = self._resp.length  # None: chunked or unknown
        return bytearray(DEFAULT_CHUNK if length is None else max(1, min(length, DEFAULT_CHUNK)))

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks()
        except BaseException:
            self._failed = True
            raise

    def _chunks(self) -> Iterator[bytes]:
        resp = self._resp
        try:
            while True:
                buf = self._buffer()
                view = memoryview(buf)
                got = 0
                try:
                    while got < len(buf):
                        n = resp.readinto(view[got:])
                        if not n:
                            break
                        got += n
                except BaseException:
                    if got:
                        # httpx types the stream as bytes; a memoryview of a pooled buffer
                        # is handed through unchanged (the pool takes it back).
                        yield view[:got]  # type: ignore[misc]
                    elif self._pool is not None:
                        self._pool.give(view)
                    raise
                if got:
                    yield view[:got]  # type: ignore[misc]
                elif self._pool is not None:
                    self._pool.give(view)
                if got < len(buf):
                    missing = resp.length  # readinto says 0 at EOF, even before the end
                    if missing:
                        raise httpx.RemoteProtocolError(
                            "peer closed connection without sending complete message body "
                            f"({missing} bytes missing)",
                            request=self._request,
                        )
                    return
        except http.client.IncompleteRead as exc:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body "
                f"({exc.expected} bytes missing)",
                request=self._request,
            ) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=self._request) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self._request) from exc

    def close(self) -> None:
        resp = self._resp
        if (
            self._release is not None
            and not self._failed
            and resp.isclosed()  # read to the end
            and not resp.will_close
        ):
            release, self._release = self._release, None
            release(self._conn)
            return
        # shutdown() first: it wakes a reader blocked in recv() in another thread at once,
        # where close() alone would wait for the read timeout.
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._resp.close()
        self._conn.close()


class DataTransport(httpx.BaseTransport):
    """GET requests over ``http.client`` (see the module doc)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        fallback: httpx.BaseTransport | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._fallback = fallback
        self._lock = threading.Lock()
        self._idle: list[tuple[_Origin, http.client.HTTPConnection]] = []
        self._closed = False

    def _fallback_transport(self) -> httpx.BaseTransport:
        with self._lock:
            if self._fallback is None:
                self._fallback = httpx.HTTPTransport(verify=self._ssl or True)
            return self._fallback

    def _take_idle(self, origin: _Origin) -> http.client.HTTPConnection | None:
        """An idle connection to ``origin`` the peer has not closed, if any."""
        while True:
            with self._lock:
                found = next((i for i, (o, _c) in enumerate(self._idle) if o == origin), None)
                if found is None:
                    return None
                _origin, conn = self._idle.pop(found)
            sock = conn.sock
            # Readable while idle: the peer closed it (EOF) or sent something unasked.
            if sock is not None and not select.select([sock], [], [], 0)[0]:
                return conn
            conn.close()

    def _release(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append((origin, conn))
                return
        conn.close()

    def _connect(
        self, origin: _Origin, request: httpx.Request, timeout: float | None
    ) -> http.client.HTTPConnection:
        scheme, host, port = origin
        conn: http.client.HTTPConnection
        if scheme == "https":
            ctx = self._ssl or ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        trace: _Trace | None = request.extensions.get("trace")
        if trace is not None:
            trace("connection.connect_tcp.started", {"host": host, "port": port})
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise httpx.ConnectTimeout(str(exc) or "timed out", request=request) from exc
        except OSError as exc:
            conn.close()
            raise httpx.ConnectError(str(exc), request=request) from exc
        return conn

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if request.method != "GET" or url.scheme not in ("http", "https"):
            return self._fallback_transport().handle_request(request)
        connect_timeout, read_timeout = _timeouts(request)
        origin: _Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        conn = self._take_idle(origin) or self._connect(origin, request, connect_timeout)
        try:
            sock = conn.sock
            if sock is not None:
                sock.settimeout(read_timeout)
            try:
                conn.putrequest(
                    request.method,
                    url.raw_path.decode("ascii"),
                    skip_host=True,
                    skip_accept_encoding=True,
                )
                for key, value in request.headers.raw:
                    conn.putheader(key.decode("latin-1"), value.decode("latin-1"))
                conn.endheaders(request.read() or None)
                resp = conn.getresponse()
            except TimeoutError as exc:
                raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
            except http.client.RemoteDisconnected as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        except BaseException:
            conn.close()
            raise
        pool = request.extensions.get(EXTENSION)
        body = _Body(
            conn,
            sock,
            resp,
            request,
            pool if isinstance(pool, BufferPool) else None,
            lambda c: self._release(origin, c),
        )
        return httpx.Response(
            resp.status,
            headers=resp.getheaders(),
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": resp.reason.encode()},
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            fallback = self._fallback
        for _origin, conn in idle:
            conn.close()
        if fallback is not None:
            fallback.close()
