"""Serving image bytes: ``sendfile(2)`` when possible, else large ``os.pread`` chunks.

Starlette's ``FileResponse`` reads 64 KiB at a time. Under uvicorn with the asyncio
loop the body goes out with ``loop.sendfile`` (zero copy); otherwise large ``pread``
chunks keep the per-chunk cost of the event loop small enough for GB/s over loopback. Memory stays
bounded by uvicorn's flow control (``send`` waits while the socket buffer is full).
The descriptor is opened before the response starts, so deleting the image while it
is being downloaded does not disturb the transfer (the unlinked file stays readable).

With drop-behind (``images_drop_upload_cache``: the store keeps images out of the page
cache) the body is sent in windows of :data:`DROP_WINDOW` bytes and each window is
dropped once the next has gone out, so the pages are reused: a download never fills
fresh memory (costly on a VM that hands free memory back to its host: a cold 1 GiB
download went from about 0.5 to 1.5-1.7 GB/s here), and a cached file is not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# With drop-behind, the file is sent in windows of this size and each window leaves the
# page cache once the next one has been sent, so one download never fills fresh memory.
DROP_WINDOW = 32 * 1024 * 1024


def _drop(fd: int, start: int, end: int) -> None:
    with contextlib.suppress(OSError):  # advisory
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


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
        drop_behind: bool = False,
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
        self._drop_behind = drop_behind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            sent = await self._zero_copy(receive)
            await self._copy(receive, send, self._offset + sent, self._length - sent)
        finally:
            os.close(self._fd)

    async def _zero_copy(self, receive: Receive) -> int:
        """Send the body with ``sendfile(2)`` when the server allows it; bytes sent.

        Uvicorn has no ASGI zero-copy extension, so this reaches its connection object
        (the owner of ``receive``) for the socket transport and accounts the bytes there.
        Any other server, or an event loop without native sendfile (uvloop), gets 0
        and the copying path sends the body.
        """
        cycle: Any = getattr(receive, "__self__", None)
        transport = getattr(cycle, "transport", None)
        expected = getattr(cycle, "expected_content_length", None)
        if transport is None or expected != self._length or self._length == 0:
            return 0
        loop = asyncio.get_running_loop()
        window = DROP_WINDOW if self._drop_behind else self._length
        end = self._offset + self._length
        sent = 0
        with open(self._fd, "rb", buffering=0, closefd=False) as fileobj:
            try:
                while sent < self._length:
                    pos = self._offset + sent
                    n = await loop.sendfile(
                        transport, fileobj, pos, min(window, end - pos), fallback=False
                    )
                    if n == 0:  # the file shrank under us: the copying path ends it
                        break
                    sent += n
                    if self._drop_behind and pos > self._offset:
                        _drop(self._fd, max(self._offset, pos - window), pos)
            except (NotImplementedError, asyncio.SendfileNotAvailableError, AttributeError):
                if sent:
                    raise
                return 0  # nothing was sent
            except (ConnectionError, OSError) as exc:
                log.info("download ended early: %s", exc)
                sent = self._length  # the client is gone; nothing more to send
        cycle.expected_content_length = expected - sent
        log.debug("sent %d bytes with sendfile", sent)
        return sent

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
