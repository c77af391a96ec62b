"""The real ``cowfleet serve images`` refuses what Glance refuses and never stores what it
cannot send back: invalid text (SQLite and PostgreSQL), oversized or slow request headers
(raw sockets), store files no record explains (removed at start), and token files that
others may read."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from cowfleet.hashtree import tree_of
from tests.conftest import require_env
from tests.fixtures.images import ImageService
from tests.integration.test_server_http import OCTETS, PATCH, create, raw_partial_upload, wait_for

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident memory of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_all(s: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (or ``timeout``)."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def all_pages(http: httpx.Client) -> list[dict[str, object]]:
    images: list[dict[str, object]] = []
    url: str | None = "/v2/images?limit=5"
    while url:
        r = http.get(url)
        assert r.status_code == 200, r.text
        images += r.json()["images"]
        url = r.json().get("next")
    return images


# -- invalid text ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_invalid_text_is_400_and_never_stored(
    image_service_factory: Callable[..., ImageService], backend: str
) -> None:
    database = require_env("COWFLEET_TEST_POSTGRES_URL") if backend == "postgresql" else None
    svc = image_service_factory(database=database)
    marker = f"bad-text-{uuid.uuid4().hex[:8]}"
    json_type = {"Content-Type": "application/json"}
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as http:
        for body in (
            '{"name": "%s", "prop": "\\ud800"}' % marker,  # noqa: UP031
            '{"name": "%s", "k\\udc00": "v"}' % marker,  # noqa: UP031
            '{"name": "%s\\u0000"}' % marker,  # noqa: UP031
            '{"name": "%s", "prop": "a\\u0000"}' % marker,  # noqa: UP031
            '{"name": "%s", "tags": ["\\ud83d"]}' % marker,  # noqa: UP031
            "[" * 5000 + "]" * 5000,
        ):
            r = http.post("/v2/images", content=body.encode(), headers=json_type)
            assert r.status_code == 400, (body[:60], r.status_code, r.text)
        iid = create(http, name=marker)
        url = f"/v2/images/{iid}"
        for op in (
            '[{"op": "add", "path": "/prop", "value": "\\ud800"}]',
            '[{"op": "add", "path": "/name", "value": "x\\udfff"}]',
            '[{"op": "add", "path": "/prop", "value": "\\u0000"}]',
        ):
            r = http.patch(url, content=op.encode(), headers=PATCH)
            assert r.status_code == 400, (op, r.text)
        img = http.get(url).json()
        assert "prop" not in img and img["name"] == marker
        # Every list page and the image itself still answer; it can be deleted.
        assert [i["id"] for i in all_pages(http) if i["name"] == marker] == [iid]
        assert http.get("/v2/images", params={"name": marker}).status_code == 200
        assert http.get("/v2/images", params={"name": "a\x00"}).status_code == 400
        assert http.delete(url).status_code == 204
        assert [i for i in all_pages(http) if str(i["name"]).startswith(marker)] == []


# -- request headers ------------------------------------------------------------------


def _start_headers(svc: ImageService) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", svc.port))
    s.sendall(b"GET /v2/images HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    return s


def test_oversized_headers_get_431_and_memory_stays_flat(
    image_service_factory: Callable[..., ImageService],
) -> None:
    svc = image_service_factory()
    before = rss(svc.pid)
    socks = [_start_headers(svc) for _ in range(4)]
    chunk = b"a" * MIB
    for s in socks:
        sent = 0
        try:
            while sent < 32 * MIB:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        # 32 MiB that never end: the server refused long before.
        assert sent < 32 * MIB, "the server read 32 MiB of headers"
    grown = rss(svc.pid) - before
    for s in socks:
        answer = read_all(s, 10)
        s.close()
        # The answer may be lost to a reset when the client was still sending.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert grown < 16 * MIB, f"server RSS grew by {grown / MIB:.0f} MiB"
    # One more, sending whole headers over the limit and then waiting for the answer.
    with socket.create_connection(("127.0.0.1", svc.port)) as s:
        s.sendall(b"GET /v2/images HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"b" * 70_000 + b"\r\n\r\n")
        answer = read_all(s, 10)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"larger than 65536 bytes" in answer
    # Headers under the limit are served, on the same keep-alive connection twice.
    pad = "p" * 60_000
    with httpx.Client(base_url=svc.url, headers={**svc.headers, "X-Pad": pad}) as http:
        assert http.get("/v2/images").status_code == 200
        assert http.get("/v2/images").status_code == 200


def test_uploads_still_work_behind_the_header_guard(
    image_service_factory: Callable[..., ImageService],
) -> None:
    # Bodies (streamed, chunked, taken over from the socket) never count as headers.
    svc = image_service_factory(settings={"COWFLEET_IMAGES_MAX_HEADER_BYTES": "4096"})
    data = os.urandom(3 * MIB)
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as http:
        for content in (data, iter([data[: MIB + 5], data[MIB + 5 :]])):
            iid = create(http)
            r = http.put(f"/v2/images/{iid}/file", content=content, headers=OCTETS)
            assert r.status_code == 204, r.text
            assert http.get(f"/v2/images/{iid}/file").content == data
        small = b"s" * 2000
        for _ in range(3):  # small bodies on one keep-alive connection
            iid = create(http)
            r = http.put(f"/v2/images/{iid}/file", content=small, headers=OCTETS)
            assert r.status_code == 204


def test_slow_or_missing_headers_are_closed_after_the_timeout(
    image_service_factory: Callable[..., ImageService],
) -> None:
    svc = image_service_factory(settings={"COWFLEET_IMAGES_HEADER_TIMEOUT": "1.5"})
    idle = socket.create_connection(("127.0.0.1", svc.port))
    slow = _start_headers(svc)
    started = time.monotonic()
    closed_after = None
    try:
        for _ in range(40):  # one byte every 0.2 s: 8 s of trickle if never closed
            slow.sendall(b"x")
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        closed_after = time.monotonic() - started
    answer = read_all(slow, 5)
    if closed_after is None:  # the last bytes may have been accepted before the close
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        closed_after = time.monotonic() - started
    assert closed_after < 6, closed_after
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert read_all(idle, 5).startswith(b"HTTP/1.1 408 ")
    slow.close()
    idle.close()
    # A client that sends its request in time is served (after a pause longer than the
    # header timeout between two requests on one connection: uvicorn's keep-alive closes
    # it, and httpx opens a new one).
    with httpx.Client(base_url=svc.url, headers=svc.headers) as http:
        assert http.get("/v2/images").status_code == 200
        time.sleep(2)
        assert http.get("/v2/images").status_code == 200


# -- uploads in flight ----------------------------------------------------------------


def test_uploads_over_the_caps_get_503_with_retry_after(
    image_service_factory: Callable[..., ImageService],
) -> None:
    svc = image_service_factory(
        settings={"COWFLEET_IMAGES_MAX_UPLOADS": "3", "COWFLEET_IMAGES_MAX_UPLOADS_PER_TOKEN": "2"}
    )
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as http:
        ids = [create(http) for _ in range(3)]

        def saving() -> int:
            return len(http.get("/v2/images", params={"status": "saving"}).json()["images"])

        # Two stalled uploads (2 MiB sent of 64: the server reads them from the socket).
        stalled = [raw_partial_upload(svc, iid, 64 * MIB, b"s" * 2 * MIB) for iid in ids[:2]]
        wait_for(lambda: saving() == 2)
        r = http.put(f"/v2/images/{ids[2]}/file", content=b"x" * 4096, headers=OCTETS)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0 and "with this token" in r.json()["message"]
        assert http.get(f"/v2/images/{ids[2]}").json()["status"] == "queued"
        for s in stalled:
            s.close()
        wait_for(lambda: saving() == 0)
        r = http.put(f"/v2/images/{ids[2]}/file", content=b"x" * 4096, headers=OCTETS)
        assert r.status_code == 204, r.text


# -- store reconciliation -------------------------------------------------------------


def test_files_no_record_explains_are_removed_at_start(
    image_service_factory: Callable[..., ImageService],
) -> None:
    svc = image_service_factory()
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as http:
        kept, lost, young = create(http), create(http), create(http)
        for iid in (kept, lost, young):
            assert http.put(f"/v2/images/{iid}/file", content=b"d" * 4096, headers=OCTETS)
    svc.stop()
    images = svc.data_dir / "images"
    # A kill between the catalog delete and the file delete: the row is gone, the file not.
    engine = create_engine(f"sqlite:///{svc.data_dir / 'catalog.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM images WHERE id IN (:a, :b)"), {"a": lost, "b": young})
    engine.dispose()
    stray = images / "not-an-image"
    stray.write_bytes(b"?")
    hour_ago = time.time() - 3700
    tree = ".tree"  # each image's hash tree leaf list goes (or stays) with it
    for path in (
        images / kept,
        images / lost,
        stray,
        images / (kept + tree),
        images / (lost + tree),
    ):
        os.utime(path, (hour_ago, hour_ago))
    staged = svc.data_dir / "staging" / f"{lost}.abcdef.part"
    staged.write_bytes(b"half")
    svc.start()
    assert sorted(p.name for p in images.iterdir()) == sorted(
        [kept, kept + tree, young, young + tree]
    )
    assert not staged.exists()
    log = svc.log_path.read_text()
    assert f"removed {images / lost} (4096 bytes)" in log
    assert f"removed {stray} (1 bytes)" in log
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as http:
        assert http.get(f"/v2/images/{kept}/file").content == b"d" * 4096
        assert http.get(f"/v2/images/{kept}/tree").content == tree_of(b"d" * 4096).leaves


# -- token file -----------------------------------------------------------------------


def test_token_file_others_can_read_is_refused_unless_allowed(
    image_service_factory: Callable[..., ImageService],
) -> None:
    svc = image_service_factory()
    svc.stop()
    svc.token_file.chmod(0o644)
    r = subprocess.run(svc.argv(), env=svc.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"token file {svc.token_file}" in r.stderr and "chmod 600" in r.stderr
    client_env = {**svc.env(), "COWFLEET_IMAGE_URL": svc.url}
    client = [*svc.argv()[:3], "image", "list", "--token-file", str(svc.token_file)]
    r = subprocess.run(client, env=client_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "chmod 600" in r.stderr, r.stderr
    svc.settings["COWFLEET_IMAGES_ALLOW_INSECURE_TOKEN_FILE"] = "true"
    svc.start()
    assert "can be read or written by other users" in svc.log_path.read_text()
    client_env["COWFLEET_IMAGES_ALLOW_INSECURE_TOKEN_FILE"] = "true"
    r = subprocess.run(client, env=client_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
