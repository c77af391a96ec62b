"""Upload bodies and the resend rule of ``images.http.send`` (httpx.MockTransport).

A MockTransport opens no connection, so every attempt looks like one on a reused
connection; a handler that reports ``connection.connect_tcp`` through the trace
extension plays an attempt on a connection of its own.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cowfleet.errors import BackendUnavailableError, ValidationError
from cowfleet.images.body import (
    FILE_CHUNK,
    REPLAY_LIMIT,
    STREAM_CHUNK,
    FileBody,
    StreamBody,
    upload_body,
)
from cowfleet.images.client import ImageClient
from cowfleet.images.http import STALE_RETRIES

IID = "11111111-2222-4333-8444-555555555555"
MiB = 1024 * 1024


def record() -> dict[str, object]:
    return {"id": IID, "name": "i", "status": "active", "disk_format": "raw", "size": 1}


def flaky(
    fail_first: int, bodies: list[bytes], *, fresh: bool = False
) -> Callable[[httpx.Request], httpx.Response]:
    """Drop the first ``fail_first`` PUTs (after reading their body); answer the rest."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=record())
        bodies.append(b"".join(request.stream))  # type: ignore[union-attr]
        if len(bodies) <= fail_first:
            if fresh:
                request.extensions["trace"]("connection.connect_tcp.started", {})
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(204)

    return handler


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> ImageClient:
    return ImageClient("http://svc", transport=httpx.MockTransport(handler), retries=0)


def test_file_body_is_rewound_to_where_it_started(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    src = tmp_path / "f"
    src.write_bytes(b"HEAD" + data)
    bodies: list[bytes] = []
    with src.open("rb") as fh:
        fh.seek(4)  # the upload is the rest of the file
        client_for(flaky(1, bodies)).upload(IID, fh)
    assert bodies == [data, data]


def test_pipe_body_is_replayed_only_within_its_kept_prefix() -> None:
    small = [os.urandom(MiB) for _ in range(3)]
    bodies: list[bytes] = []
    client_for(flaky(1, bodies)).upload(IID, iter(small))
    assert bodies == [b"".join(small)] * 2

    large = [os.urandom(MiB) for _ in range(REPLAY_LIMIT // MiB + 1)]
    bodies = []
    with pytest.raises(BackendUnavailableError, match="disconnected"):
        client_for(flaky(1, bodies)).upload(IID, iter(large))
    assert len(bodies) == 1  # more than REPLAY_LIMIT went out: not sent again


def test_resend_stops_on_a_new_connection_and_after_the_cap() -> None:
    bodies: list[bytes] = []
    with pytest.raises(BackendUnavailableError):
        client_for(flaky(9, bodies, fresh=True)).upload(IID, b"x" * 10)
    assert len(bodies) == 1

    bodies = []
    with pytest.raises(BackendUnavailableError):
        client_for(flaky(99, bodies)).upload(IID, io.BytesIO(b"x" * 10))
    assert len(bodies) == 1 + STALE_RETRIES


def test_unknown_length_goes_out_in_small_chunks() -> None:
    seen: list[int] = []
    body, size = upload_body(iter([os.urandom(3 * MiB + 5), b"", b"tail"]), None, None)
    for chunk in body:
        seen.append(len(chunk))
    assert size is None and max(seen) <= STREAM_CHUNK and sum(seen) == 3 * MiB + 9

    r, w = os.pipe()
    with os.fdopen(w, "wb") as out:
        out.write(b"p" * 50_000)
    with os.fdopen(r, "rb") as pipe:
        body, size = upload_body(pipe, None, None)
        assert isinstance(body, StreamBody) and size is None

    seekable, size = upload_body(io.BytesIO(b"b" * (2 * MiB)), None, None)
    assert isinstance(seekable, FileBody) and size is None
    assert max(len(c) for c in seekable) <= STREAM_CHUNK


def test_known_length_file_reads_big_blocks_and_checks_its_size(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"z" * (FILE_CHUNK + 1))
    with src.open("rb") as fh:
        body, size = upload_body(fh, None, None)
        assert size == FILE_CHUNK + 1
        assert [len(c) for c in body] == [FILE_CHUNK, 1]
    with src.open("rb") as fh, pytest.raises(ValidationError, match="longer than"):
        list(FileBody(fh, 10))
    with src.open("rb") as fh, pytest.raises(ValidationError, match="ended at"):
        list(FileBody(fh, FILE_CHUNK + 2))


def test_progress_restarts_with_the_body() -> None:
    calls: list[tuple[int, int | None]] = []
    body = StreamBody(iter([b"a" * 10, b"b" * 10]), 20, lambda d, t: calls.append((d, t)))
    list(body)
    assert body.rewind()
    list(body)
    assert calls == [(10, 20), (20, 20), (10, 20), (20, 20)]


def test_post_is_sent_once() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ReadError("connection reset")

    with pytest.raises(BackendUnavailableError):
        client_for(handler).create(name="x", disk_format="raw")
    assert calls == ["POST"]
