"""A lean reader of image bodies: ``GET /v2/images/{id}/file`` with ``http.client``.

Why: on this class of machine httpx's streaming path (h11 events of 64 KiB joined
into big chunks) tops out near 370 MiB/s on loopback, below what sha512 and the
page cache sustain, so it would be the bottleneck of a cold fetch. ``http.client``
reads a whole chunk with one buffered ``read`` (well over 1 GB/s here). Only the body
download takes this path; the image record still comes from
:class:`~cowfleet.images.client.ImageClient`, whose endpoint, token and timeout this
reuses (:func:`from_client`). It offers the same ``open_download`` /
``DownloadStream`` shape, and maps errors onto the same exception tree.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    NotFoundError,
    RemoteError,
    TimeoutError_,
    UsageError,
)

log = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
POOL_MAX = 16  # reusable chunk buffers kept per process

# Reused chunk buffers: a fresh 2 MiB bytes per chunk costs page faults (glibc maps
# and unmaps big blocks). The sink hands a buffer back (:func:`release`) once the
# last user (the writer) is done with it; a buffer never handed back is just garbage.
_pool: list[bytearray] = []
_pool_lock = threading.Lock()


def _take(size: int) -> bytearray:
    with _pool_lock:
        while _pool:
            buf = _pool.pop()
            if len(buf) == size:
                return buf
    return bytearray(size)


def release(chunk: object) -> None:
    """Return a chunk's buffer to the pool (called by the sink's writer after writing)."""
    if isinstance(chunk, memoryview) and type(chunk.obj) is bytearray:
        with _pool_lock:
            if len(_pool) < POOL_MAX:
                _pool.append(chunk.obj)


def _translate(exc: BaseException, endpoint: str, what: str) -> Exception:
    if isinstance(exc, TimeoutError | socket.timeout):
        return TimeoutError_(f"{what}: the image service at {endpoint} timed out")
    if isinstance(exc, http.client.IncompleteRead):
        return BackendUnavailableError(
            f"{what}: peer closed connection without sending complete message body "
            f"(got {len(exc.partial)} more bytes, {exc.expected} missing)"
        )
    return BackendUnavailableError(
        f"{what}: connection to image service at {endpoint} failed: {exc}"
    )


@dataclass
class BodyStream:
    """One response body (the ``DownloadStream`` shape)."""

    status: int
    offset: int
    total_size: int | None
    content_md5: str | None
    _resp: http.client.HTTPResponse
    _endpoint: str
    _what: str

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[memoryview]:
        """Chunks as memoryviews of pooled buffers (see :func:`release`)."""
        resp = self._resp
        try:
            while True:
                buf = _take(chunk_size)
                view = memoryview(buf)
                got = 0
                while got < chunk_size:
                    n = resp.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got:
                    yield view[:got]
                if got < chunk_size:
                    missing = resp.length  # None when the length is not known (chunked)
                    if missing:
                        raise BackendUnavailableError(
                            f"{self._what}: peer closed connection without sending complete "
                            f"message body ({missing} bytes missing)"
                        )
                    return
        except (OSError, http.client.HTTPException) as exc:
            raise _translate(exc, self._endpoint, self._what) from exc


class BodyReader:
    """``open_download`` over plain ``http.client`` connections (one per download)."""

    def __init__(self, endpoint: str, token: str | None, timeout: float) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"unsupported image service URL {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout = max(timeout, 60.0)

    def _connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    @contextlib.contextmanager
    def open_download(self, image_id: str, *, offset: int = 0) -> Iterator[BodyStream]:
        what = f"download image {image_id}"
        headers = {
            "Accept": "application/octet-stream",
            "Accept-Encoding": "identity",
            "User-Agent": "cowfleet-cache",
        }
        if self.token:
            headers["X-Auth-Token"] = self.token
        if offset:
            headers["Range"] = f"bytes={offset}-"
        conn = self._connect()
        try:
            try:
                conn.request(
                    "GET",
                    f"{self.prefix}/v2/images/{quote(image_id, safe='')}/file",
                    headers=headers,
                )
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise _translate(exc, self.endpoint, what) from exc
            yield self._stream(resp, image_id, what)
        finally:
            # shutdown() first: it wakes a reader blocked in recv() in another thread
            # at once, where close() alone would wait for the read timeout.
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _stream(self, resp: http.client.HTTPResponse, image_id: str, what: str) -> BodyStream:
        status = resp.status
        md5 = resp.getheader("Content-MD5")
        if status == 206:
            raw = (resp.getheader("Content-Range") or "").strip()
            m = _CONTENT_RANGE.match(raw)
            if m is None:
                raise RemoteError(f"{what}: bad Content-Range {raw!r} on a 206 answer", status=206)
            total = None if m.group(3) == "*" else int(m.group(3))
            return BodyStream(206, int(m.group(1)), total, md5, resp, self.endpoint, what)
        if status == 200:
            length = resp.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
            return BodyStream(200, 0, total, md5, resp, self.endpoint, what)
        body = b""
        with contextlib.suppress(OSError, http.client.HTTPException):
            body = resp.read(4096)
        detail = body.decode("utf-8", "replace").strip()[:200]
        if status == 204:
            raise ConflictError(f"{what}: the image has no data yet", image_id=image_id)
        if status in (401, 403):
            raise UsageError(f"{what}: authentication failed (HTTP {status}); check the token")
        if status == 404:
            raise NotFoundError(f"{what}: no such image", image_id=image_id)
        raise RemoteError(f"{what}: HTTP {status} {detail}", status=status)


def from_client(client: Any) -> BodyReader | None:
    """A :class:`BodyReader` with ``client``'s endpoint, token and timeout, when it has them.

    Returns None for anything else (a fake, a custom transport): the caller then
    reads through ``client.open_download``.
    """
    endpoint = getattr(client, "endpoint", None)
    http_client = getattr(client, "_http", None)
    if not isinstance(endpoint, str) or http_client is None:
        return None
    if (
        getattr(http_client, "_transport", None) is not None
        and type(http_client._transport).__name__ != "HTTPTransport"
    ):
        return None  # a mock or custom transport: honour it
    headers = getattr(http_client, "headers", {})
    token = headers.get("X-Auth-Token") if hasattr(headers, "get") else None
    timeout = float(getattr(client, "timeout", 30.0))
    try:
        return BodyReader(endpoint, token, timeout)
    except UsageError:
        return None
