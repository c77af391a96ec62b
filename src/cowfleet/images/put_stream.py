"""``PUT /v2/images/{id}/file`` of a generated stream of known length, at wire speed.

The image client's uploads go through httpx's own transport, which writes a body in
pieces of at most 512 KiB through h11: fine for a file, but a snapshot's stream is made
in 4 MiB batches and the HTTP layer became its bottleneck. Here the request line and
headers go out through :mod:`http.client` and every chunk with one ``sendall``;
the answer is then read and judged by the image client's own
:func:`~cowfleet.images.http.raise_for_status` (same errors: 507 is
:class:`~cowfleet.errors.StorageFullError`-like "image service error", 413 too large,
415 refused...). A server that answers early (full, refused) and closes is read too.
"""

from __future__ import annotations

import http.client
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar
from urllib.parse import quote, urlsplit

import httpx

from cowfleet.errors import BackendUnavailableError
from cowfleet.images.http import raise_for_status

T = TypeVar("T")


def put_stream(
    endpoint: str,
    token: str | None,
    image_id: str,
    chunks: Iterable[bytes | bytearray],
    size: int,
    *,
    timeout: float = 600.0,
) -> None:
    """Upload ``size`` bytes from ``chunks`` as the data of ``image_id``."""
    url = urlsplit(endpoint.rstrip("/").removesuffix("/v2"))
    host = url.hostname or "127.0.0.1"
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, url.port, timeout=timeout, context=httpx.create_ssl_context()
        )
    else:
        conn = http.client.HTTPConnection(host, url.port, timeout=timeout)
    path = f"{url.path}/v2/images/{quote(image_id, safe='')}/file"
    what = f"upload image {image_id}"
    sent = 0
    try:
        try:
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            if token:
                conn.putheader("X-Auth-Token", token)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            conn.putheader("User-Agent", "cowfleet-snapshot")
            conn.endheaders()
            assert conn.sock is not None
            for chunk in chunks:
                conn.sock.sendall(chunk)
                sent += len(chunk)
            if sent != size:
                raise BackendUnavailableError(f"{what}: made {sent} bytes, announced {size}")
        except OSError as exc:
            send_error: OSError | None = exc
        else:
            send_error = None
        try:
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            cause = send_error or exc
            raise BackendUnavailableError(
                f"{what}: the image service closed the connection after {sent} bytes: {cause}"
            ) from cause
        answer = httpx.Response(resp.status, content=body, headers=list(resp.getheaders()))
        raise_for_status(answer, what)
        if send_error is not None:  # a 2xx before the whole body: should not happen
            raise BackendUnavailableError(f"{what}: sending failed: {send_error}")
    finally:
        conn.close()


def prefetched(source: Iterator[T], depth: int = 3) -> Iterator[T]:
    """``source``'s items, made in a thread ``depth`` items ahead of the consumer (reading
    the disk overlaps sending). The thread stops when the consumer stops."""
    q: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put((0, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((1, None))
        except BaseException as exc:  # handed to the consumer
            q.put((2, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="snapshot-read", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == 1:
                return
            if kind == 2:
                assert isinstance(item, BaseException)
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=30)
