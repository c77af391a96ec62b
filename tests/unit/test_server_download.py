"""The zero-copy download path on a real asyncio socket transport (no HTTP server)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from cowfleet.images.server import download
from cowfleet.images.server.download import DescriptorResponse


class Cycle:
    """What the response looks for on uvicorn's ``receive`` owner."""

    def __init__(self, transport: asyncio.Transport, length: int) -> None:
        self.transport = transport
        self.expected_content_length = length

    async def receive(self) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}


def serve(path: Path, offset: int, length: int, *, drop_behind: bool) -> tuple[bytes, list[str]]:
    async def run() -> tuple[bytes, list[str]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        fd = os.open(path, os.O_RDONLY)
        resp = DescriptorResponse(
            fd,
            offset=offset,
            length=length,
            status_code=206,
            headers={},
            chunk_size=4096,
            drop_behind=drop_behind,
        )
        cycle = Cycle(transport, length)
        sent: list[str] = []

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg["type"])

        received = bytearray()

        async def drain() -> None:
            while len(received) < length:
                chunk = await loop.sock_recv(theirs, 1 << 20)
                assert chunk
                received.extend(chunk)

        await asyncio.wait_for(
            asyncio.gather(resp(scope={}, receive=cycle.receive, send=send), drain()), 20
        )
        assert cycle.expected_content_length == 0  # every byte went out with sendfile
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the response
        transport.close()
        theirs.close()
        return bytes(received), sent

    return asyncio.run(run())


@pytest.mark.parametrize("drop_behind", [False, True])
def test_sendfile_in_windows_sends_every_byte_of_the_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop_behind: bool
) -> None:
    window = 64 * 1024
    monkeypatch.setattr(download, "DROP_WINDOW", window)
    dropped: list[tuple[int, int]] = []
    real_drop = download._drop

    def record(fd: int, start: int, end: int) -> None:
        dropped.append((start, end))
        real_drop(fd, start, end)

    monkeypatch.setattr(download, "_drop", record)
    data = os.urandom(5 * window + 777)
    path = tmp_path / "image"
    path.write_bytes(data)
    offset, length = 1000, len(data) - 1500
    got, sent = serve(path, offset, length, drop_behind=drop_behind)
    assert got == data[offset : offset + length]
    assert sent[0] == "http.response.start"
    if drop_behind:
        # Every window but the last leaves the cache, in order, once the next was sent.
        windows = -(-length // window)
        assert windows == 5
        expected = [(offset + i * window, offset + (i + 1) * window) for i in range(windows - 1)]
        assert dropped == expected
    else:
        assert dropped == []
