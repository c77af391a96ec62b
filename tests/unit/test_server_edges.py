"""The image server's edges, in process: the token-file check (server and client), the
store's reconciliation with the catalog at start, and the header guard around the HTTP
protocol (with a recording inner protocol and a fake transport)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cowfleet.config import load
from cowfleet.errors import ConfigError
from cowfleet.images.client import ImageClient
from cowfleet.images.server import create_app
from cowfleet.images.server.guard import guarded
from cowfleet.images.server.store import orphans
from cowfleet.images.server.token import load_or_create_token
from cowfleet.images.token_file import read_token_file
from tests.unit.test_server_api import AUTH, create, settings, upload

# -- token file -------------------------------------------------------------------------


def test_created_token_file_is_0600_even_with_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        token = load_or_create_token(tmp_path / "d" / "token")
    finally:
        os.umask(old)
    path = tmp_path / "d" / "token"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_token(path) == token == read_token_file(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_token_file_others_may_use_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "token"
    path.write_text("secret\n")
    path.chmod(mode)
    with pytest.raises(ConfigError) as exc:
        load_or_create_token(path)
    assert exc.value.exit_code == 2
    assert str(path) in str(exc.value) and "chmod 600" in str(exc.value)
    cfg = load(env={"COWFLEET_HOME": str(tmp_path), "COWFLEET_IMAGE_TOKEN_FILE": str(path)})
    with pytest.raises(ConfigError):
        ImageClient.from_config(cfg)


def test_insecure_token_file_allowed_by_the_setting_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text("secret\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_or_create_token(path, allow_insecure=True) == "secret"
    assert "accepted" in caplog.text
    env = {
        "COWFLEET_HOME": str(tmp_path),
        "COWFLEET_IMAGE_TOKEN_FILE": str(path),
        "COWFLEET_IMAGES_ALLOW_INSECURE_TOKEN_FILE": "true",
    }
    with ImageClient.from_config(load(env=env)) as client:
        assert client is not None


def test_token_file_that_is_a_symlink_or_a_fifo_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text("secret")
    real.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(Exception, match="cannot read token file"):
        read_token_file(link)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(fifo, allow_insecure=True)


# -- store reconciliation ---------------------------------------------------------------


def test_orphans_plan() -> None:
    entries = [("a", 0.0), ("b", 0.0), ("c", 9000.0), ("d.part", 100.0)]
    assert orphans(entries, {"a"}, grace=3600, now=10_000) == ["b", "d.part"]
    assert orphans(entries, {"a", "b", "c", "d.part"}, grace=3600, now=10_000) == []
    assert orphans(entries, set(), grace=0, now=10_000) == ["a", "b", "c", "d.part"]


def test_start_removes_store_files_no_active_image_explains(tmp_path: Path) -> None:
    st = settings(tmp_path, orphan_grace=60)
    with TestClient(create_app(st)) as c:
        active = create(c)["id"]
        assert upload(c, active, b"a" * 4096).status_code == 204
        queued = create(c)["id"]
    images = st.images_dir
    gone = "6f1c1c0e-5d0a-4a55-9a43-8a0d1b1f0c13"
    for name in (gone, queued, "junk", f"{gone}.tree", f"{queued}.tree"):
        (images / name).write_bytes(b"x")
    (images / "link").symlink_to("/etc/passwd")
    (images / "young").write_bytes(b"y")
    (images / "folder").mkdir()
    old = time.time() - 120
    names = (active, f"{active}.tree", gone, queued, "junk", f"{gone}.tree", f"{queued}.tree")
    for name in names:
        os.utime(images / name, (old, old))
    os.utime(images / "link", (old, old), follow_symlinks=False)
    with TestClient(create_app(st)) as c:
        # An active image's hash tree leaf list stays with it; the others' go.
        assert sorted(p.name for p in images.iterdir()) == sorted(
            [active, f"{active}.tree", "young", "folder"]
        )
        assert c.get(f"/v2/images/{active}/file", headers=AUTH).content == b"a" * 4096
        assert c.get(f"/v2/images/{active}/tree", headers=AUTH).status_code == 200
    assert Path("/etc/passwd").exists()


# -- header guard -----------------------------------------------------------------------


class Inner(asyncio.Protocol):
    """Records what the guard passes on."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.data = b""
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def connect(limit: int = 1000, timeout: float = 60) -> tuple[Any, Transport]:
    cls = guarded(Inner, max_header_bytes=limit, header_timeout=timeout)
    loop = asyncio.new_event_loop()
    proto = cls(config=None, _loop=loop)
    transport = Transport()

    async def made() -> None:  # as uvicorn does: on the loop (the timers go there)
        proto.connection_made(transport)

    loop.run_until_complete(made())
    proto.test_loop = loop
    return proto, transport


def test_guard_passes_requests_and_bodies_through() -> None:
    proto, t = connect(limit=200)
    req = b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n"
    proto.data_received(req + b"a" * 3000)
    proto.data_received(b"a" * 2000 + b"GET /y HTTP/1.1\r\nHost: h\r\n")
    proto.data_received(b"\r\n")
    chunked = b"POST /z HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1000\r\n"
    proto.data_received(chunked + b"c" * 4096 + b"\r\n0\r\n\r\n")
    assert not t.closed and t.written == b""
    assert proto.inner.data.endswith(b"0\r\n\r\n")
    # Passed on as given (no app_state here, so no data plane either).
    assert proto.inner.kwargs == {"config": None, "_loop": proto.test_loop}


def test_guard_answers_431_for_headers_over_the_limit() -> None:
    # Whole headers in one read.
    proto, t = connect(limit=200)
    proto.data_received(b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 300 + b"\r\n\r\n")
    assert t.closed and t.written.startswith(b"HTTP/1.1 431 ")
    assert proto.inner.data == b""
    # Headers that never end, a little at a time: refused once past the limit.
    proto, t = connect(limit=200)
    proto.data_received(b"GET / HTTP/1.1\r\nX-Pad: ")
    sent = 0
    while not t.closed:
        proto.data_received(b"p" * 50)
        sent += 50
    assert sent <= 200 and t.written.startswith(b"HTTP/1.1 431 ")
    assert len(proto.inner.data) <= 200
    proto.data_received(b"more")  # after the refusal, nothing is passed on
    assert len(proto.inner.data) <= 200
    # The second request of a keep-alive connection has its own count.
    proto, t = connect(limit=200)
    small = b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"
    for _ in range(5):
        proto.data_received(small)
    assert not t.closed
    proto.data_received(b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 300)
    assert t.closed and t.written.startswith(b"HTTP/1.1 431 ")


def test_guard_closes_a_connection_whose_headers_are_late() -> None:
    async def run() -> None:
        cls = guarded(Inner, max_header_bytes=1000, header_timeout=0.2)
        idle, slow, quick = (cls(config=None) for _ in range(3))
        ts = [Transport() for _ in range(3)]
        for proto, t in zip((idle, slow, quick), ts, strict=True):
            proto.connection_made(t)
        quick.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        slow.data_received(b"GET / HTTP/1.1\r\n")
        for _ in range(4):
            await asyncio.sleep(0.1)
            if not ts[1].closed:
                slow.data_received(b"X")
        await asyncio.sleep(0.2)
        assert ts[0].closed and ts[0].written.startswith(b"HTTP/1.1 408 ")
        assert ts[1].closed and ts[1].written.startswith(b"HTTP/1.1 408 ")
        assert not ts[2].closed  # headers complete: the response may take its time

    asyncio.run(run())
