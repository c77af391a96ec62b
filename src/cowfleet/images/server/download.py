"""Serving image bytes: ``sendfile(2)`` when possible, else large ``os.pread`` chunks.

Starlette's ``FileResponse`` reads 64 KiB at a time. Where the server offers the ASGI
extension ``http.response.zerocopysend`` (the image server's data plane does, see
:mod:`cowfleet.images.server.dataplane`) the body goes out with ``sendfile`` (zero copy);
otherwise large ``pread`` chunks keep the per-chunk cost of the event loop small enough
for GB/s over loopback. Memory stays bounded by flow control (``send`` waits while the
socket buffer is full).
The descriptor is opened before the response starts, so deleting the image while it
is being downloaded does not disturb the transfer (the unlinked file stays readable).

What stays in the page cache: uploads are written past it (see
:mod:`cowfleet.images.server.store`), and an image is kept in it from its
``cache_min_uses``-th download on (:class:`UseCounts`; setting
``images_cache_min_uses``, 2 by default; 1 keeps every download, 0 none), as a cache
that admits an object on its second request does. Before that, a download sends the
file in windows of :data:`DROP_WINDOW` bytes and drops each window it brought in once
the next one has gone out; windows that were cached already are left alone. So a
one-off download (one node fetching an image, a backup) never pushes the images that
many nodes fetch out of memory, and never fills fresh memory: on a VM that hands free
memory back to its host that filling costs about 3.2 CPU-s per GiB, and a cold 1 GiB
download that keeps its pages ran at 0.3-0.4 GB/s here against 1.3-1.9 GB/s dropped
behind (the disk's speed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Mapping

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from cowfleet.fsutil import cached_fraction, drop_cached
from cowfleet.images.server.dataplane import ZEROCOPY

log = logging.getLogger(__name__)

# A download that does not keep what it reads sends the file in windows of this size
# and drops each window once the next one has been sent.
DROP_WINDOW = 32 * 1024 * 1024
# A window with less than this share in the page cache counts as brought in by the
# download that reads it.
COLD_BELOW = 0.5


class UseCounts:
    """How many downloads of each image this server has started (thread-safe)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, image_id: str) -> int:
        """Count one more download of ``image_id``; returns the new count."""
        with self._lock:
            n = self._counts.get(image_id, 0) + 1
            self._counts[image_id] = n
            return n

    def forget(self, image_id: str) -> None:
        with self._lock:
            self._counts.pop(image_id, None)


def _cold(fd: int, offset: int, length: int) -> bool:
    """Whether most of the range is not in the page cache (unknown: not cold)."""
    fraction = cached_fraction(fd, offset, length)
    return fraction is not None and fraction < COLD_BELOW


class DescriptorResponse(Response):
    """``length`` bytes of ``fd`` from ``offset``; closes ``fd`` when done."""

    def __init__(
        self,
        fd: int,
        *,
        offset: int,
        length: int,
        status_code: int,
        headers: Mapping[str, str],
        chunk_size: int,
        keep_cached: bool = True,
    ) -> None:
        super().__init__(
            content=None,
            status_code=status_code,
            headers={**headers, "content-length": str(length)},
            media_type="application/octet-stream",
        )
        self._fd = fd
        self._offset = offset
        self._length = length
        self._chunk = chunk_size
        self._keep_cached = keep_cached

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if self._length > 0 and ZEROCOPY in (scope.get("extensions") or {}):
                await self._zero_copy(send)
            else:
                await self._copy(receive, send, self._offset, self._length)
        finally:
            os.close(self._fd)

    async def _zero_copy(self, send: Send) -> None:
        """The body through ``http.response.zerocopysend``, one window at a time when the
        pages it brings into the page cache are to be dropped behind it."""
        window = self._length if self._keep_cached else DROP_WINDOW
        end = self._offset + self._length
        pos = self._offset
        behind: tuple[int, int] | None = None  # the last window sent, if this brought it in
        with open(self._fd, "rb", buffering=0, closefd=False) as fileobj:
            while pos < end:
                size = min(window, end - pos)
                cold = not self._keep_cached and _cold(self._fd, pos, size)
                await send(
                    {
                        "type": ZEROCOPY,
                        "file": fileobj,
                        "offset": pos,
                        "count": size,
                        "more_body": pos + size < end,
                    }
                )
                # The window before has left the socket buffer by now.
                if behind is not None:
                    drop_cached(self._fd, *behind)
                behind = (pos, size) if cold else None
                pos += size
        if behind is not None:  # pages still queued in the socket are skipped
            drop_cached(self._fd, *behind)
        log.debug("sent %d bytes with %s", self._length, ZEROCOPY)

    async def _copy(self, receive: Receive, send: Send, offset: int, length: int) -> None:
        """The body (or its rest) with large ``pread`` chunks through ASGI ``send``."""
        gone = asyncio.Event()

        async def watch() -> None:
            # The request body is complete; the next message is the disconnect.
            while True:
                msg: Message = await receive()
                if msg["type"] == "http.disconnect":
                    gone.set()
                    return

        watcher = asyncio.create_task(watch())
        try:
            pos, left = offset, length
            if left == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            while left > 0 and not gone.is_set():
                data = os.pread(self._fd, min(self._chunk, left), pos)
                if not data:  # the file shrank under us: end the response short
                    log.error("image file ended %d bytes early", left)
                    break
                pos += len(data)
                left -= len(data)
                await send({"type": "http.response.body", "body": data, "more_body": left > 0})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
