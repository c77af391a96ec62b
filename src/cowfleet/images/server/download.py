"""Serving image bytes: a response that streams a file descriptor with ``os.pread``.

Starlette's ``FileResponse`` reads 64 KiB at a time; large ``pread`` chunks keep the
per-chunk cost of the event loop small enough for GB/s over loopback. Memory stays
bounded by uvicorn's flow control (``send`` waits while the socket buffer is full).
The descriptor is opened before the response starts, so deleting the image while it
is being downloaded does not disturb the transfer (the unlinked file stays readable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            pos, left = self._offset, self._length
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
            os.close(self._fd)
