"""A data-plane transport for image bodies, plugged into httpx through its public API.

Why: httpx's default transport (httpcore + h11) delivers a body in 64 KiB events that
Python then joins; on this class of machine that tops out near 370 MiB/s on loopback,
below what sha512 and the page cache sustain, so it would be the bottleneck of a fetch.
``http.client`` reads a whole multi-MiB chunk with one ``readinto`` (over 1 GB/s here).

:class:`DataTransport` is an :class:`httpx.BaseTransport`: the image client hands it to
an ``httpx.Client`` (``transport=``) for downloads only, so requests still go through
:func:`cowfleet.images.http.send` (same headers, timeouts, error translation, trace
events). It takes the TLS context the client uses for everything else, opens one
connection per request (a download is long; there is nothing to pool) and reads the
body into the caller's reused buffers when the request carries a
:class:`~cowfleet.fetch.buffers.BufferPool` in its ``cowfleet.buffers`` extension.
Methods other than GET go to ``fallback`` (httpx's own transport). The image client
does not use it when a proxy applies to the endpoint (httpx's proxy support then).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from cowfleet.fetch.buffers import EXTENSION, BufferPool

DEFAULT_CHUNK = 1 << 20
_Trace = Callable[[str, dict[str, Any]], None]


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
    ) -> None:
        self._conn = conn
        self._sock = sock
        self._resp = resp
        self._request = request
        self._pool = pool

    def _buffer(self) -> bytearray:
        return self._pool.take() if self._pool is not None else bytearray(DEFAULT_CHUNK)

    def __iter__(self) -> Iterator[bytes]:
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
        self._fallback = fallback or httpx.HTTPTransport(verify=ssl_context or True)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if request.method != "GET" or url.scheme not in ("http", "https"):
            return self._fallback.handle_request(request)
        connect_timeout, read_timeout = _timeouts(request)
        trace: _Trace | None = request.extensions.get("trace")
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            ctx = self._ssl or ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=connect_timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        if trace is not None:
            trace("connection.connect_tcp.started", {"host": host, "port": port})
        try:
            try:
                conn.connect()
            except TimeoutError as exc:
                raise httpx.ConnectTimeout(str(exc) or "timed out", request=request) from exc
            except OSError as exc:
                raise httpx.ConnectError(str(exc), request=request) from exc
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
        body = _Body(conn, sock, resp, request, pool if isinstance(pool, BufferPool) else None)
        return httpx.Response(
            resp.status,
            headers=resp.getheaders(),
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": resp.reason.encode()},
        )

    def close(self) -> None:
        self._fallback.close()
