"""The zero-copy download path on a real asyncio socket transport: the response under
the data plane's middleware, which writes the head and sends the file (no HTTP server)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from cowfleet.fsutil import cached_fraction
from cowfleet.images.server import download
from cowfleet.images.server.dataplane import (
    STATE_KEY,
    BodyProgress,
    DataPlane,
    DataPlaneMiddleware,
)
from cowfleet.images.server.download import DescriptorResponse


async def never() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def serve(path: Path, offset: int, length: int, *, keep_cached: bool) -> tuple[bytes, list[str]]:
    """The bytes the client got after the head, and the messages the server was sent."""

    async def run() -> tuple[bytes, list[str]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        plane = DataPlane(BodyProgress())
        plane.attach(transport)
        fd = os.open(path, os.O_RDONLY)
        # Windows here are far smaller than the kernel's readahead; without this the
        # first window would bring in the whole file. (Real windows, 32 MiB, are larger
        # than the readahead.)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        resp = DescriptorResponse(
            fd,
            offset=offset,
            length=length,
            status_code=206,
            headers={},
            chunk_size=4096,
            keep_cached=keep_cached,
        )
        sent: list[str] = []

        async def send(msg: dict[str, Any]) -> None:  # the server's: what uvicorn gets
            sent.append(msg["type"])
            if msg["type"] == "http.response.start":
                assert dict(msg["headers"])[b"content-length"] == b"0"
                # uvicorn writes a head for it, which the data plane drops.
                assert plane.filter_write(b"HTTP/1.1 206 \r\ncontent-length: 0\r\n\r\n") is None

        received = bytearray()

        async def drain() -> None:
            while b"\r\n\r\n" not in received or len(received) < head() + length:
                chunk = await loop.sock_recv(theirs, 1 << 20)
                assert chunk
                received.extend(chunk)

        def head() -> int:
            return received.index(b"\r\n\r\n") + 4

        scope = {"type": "http", "method": "GET", "headers": [], "state": {STATE_KEY: plane}}
        app = DataPlaneMiddleware(resp)
        await asyncio.wait_for(asyncio.gather(app(scope, never, send), drain()), 20)
        assert received.startswith(b"HTTP/1.1 206 Partial Content\r\n")
        assert f"content-length: {length}\r\n".encode() in received[: head()]
        assert b"x-cowfleet-data-plane: sendfile\r\n" in received[: head()]
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the response
        transport.close()
        theirs.close()
        return bytes(received[head() :]), sent

    return asyncio.run(run())


def cold_file(path: Path, data: bytes) -> None:
    """``data`` on disk and out of the page cache (``path`` in an ``evictable_dir``)."""
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert cached_fraction(fd, 0, len(data)) == 0.0, f"{path} stayed in the page cache"
    finally:
        os.close(fd)


@pytest.mark.parametrize("keep_cached", [True, False])
def test_sendfile_in_windows_sends_every_byte_of_the_range(
    evictable_dir: Path, monkeypatch: pytest.MonkeyPatch, keep_cached: bool
) -> None:
    window = 64 * 1024
    monkeypatch.setattr(download, "DROP_WINDOW", window)
    dropped: list[tuple[int, int]] = []
    real_drop = download.drop_cached

    def record(fd: int, start: int, length: int) -> None:
        dropped.append((start, start + length))
        real_drop(fd, start, length)

    monkeypatch.setattr(download, "drop_cached", record)
    data = os.urandom(5 * window + 777)
    path = evictable_dir / "image"
    cold_file(path, data)
    offset, length = 1000, len(data) - 1500
    got, sent = serve(path, offset, length, keep_cached=keep_cached)
    assert got == data[offset : offset + length]
    # Every byte went out with sendfile: the server got an empty response to complete.
    assert sent == ["http.response.start", "http.response.body"]
    fd = os.open(path, os.O_RDONLY)
    try:
        cached = cached_fraction(fd, offset, length)
    finally:
        os.close(fd)
    if keep_cached:
        assert dropped == []
        assert cached == 1.0
    else:
        # Every window this download brought in leaves the cache, in order, the last too.
        windows = -(-length // window)
        assert windows == 5
        ends = [min(offset + (i + 1) * window, offset + length) for i in range(windows)]
        assert dropped == [(offset + i * window, ends[i]) for i in range(windows)]
        assert cached is not None and cached < 0.5


def test_windows_that_were_cached_already_stay_cached(
    evictable_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 64 * 1024
    monkeypatch.setattr(download, "DROP_WINDOW", window)
    data = os.urandom(4 * window)
    path = evictable_dir / "image"
    cold_file(path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, window, window)  # someone else read window 1: it is cached
        got, _ = serve(path, 0, len(data), keep_cached=False)
        assert got == data
        assert cached_fraction(fd, window, window) == 1.0
        for i in (0, 2, 3):
            frac = cached_fraction(fd, i * window, window)
            assert frac is not None and frac < 0.5, i
    finally:
        os.close(fd)


def test_use_counts_count_per_image_and_forget() -> None:
    uses = download.UseCounts()
    assert [uses.count("a"), uses.count("a"), uses.count("b"), uses.count("a")] == [1, 2, 1, 3]
    uses.forget("a")
    uses.forget("never-counted")
    assert uses.count("a") == 1
