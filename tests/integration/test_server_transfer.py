"""The real image server's transfer paths: bodies read straight from the socket, O_DIRECT
uploads, and what downloads leave in the page cache (seen with util-linux's ``fincore``)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require_program, small_tmpfs
from tests.fixtures.images import ImageService
from tests.integration.test_server_http import create, wait_for
from tests.unit.hostile_corpus import MIB

pytestmark = pytest.mark.integration

OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def http(image_service: ImageService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=image_service.url, headers=image_service.headers, timeout=60) as c:
        yield c


def check_stored(http: httpx.Client, image_id: str, data: bytes) -> None:
    img = http.get(f"/v2/images/{image_id}").json()
    assert img["status"] == "active"
    assert img["size"] == len(data)
    assert img["checksum"] == hashlib.md5(data).hexdigest()
    assert img["os_hash_value"] == hashlib.sha512(data).hexdigest()
    got = http.get(f"/v2/images/{image_id}/file")
    assert got.status_code == 200 and got.content == data


def test_a_large_body_is_read_from_the_socket_and_the_connection_then_closes(
    http: httpx.Client,
) -> None:
    data = os.urandom(24 * MIB + 12345)  # not a multiple of any block: a padded tail
    iid = create(http)
    r = http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS)
    assert r.status_code == 204, r.text
    # The data plane read the body (the header is set nowhere else), and uvicorn's
    # parser never saw those bytes: the connection must not be reused.
    assert r.headers.get("x-cowfleet-data-plane") == "receive"
    assert r.headers.get("connection") == "close"
    check_stored(http, iid, data)  # the same client carries on, on a new connection


def test_small_and_chunked_bodies_take_the_asgi_path_and_keep_the_connection(
    http: httpx.Client,
) -> None:
    small = os.urandom(300 * 1024)
    iid = create(http, name="small")
    r = http.put(f"/v2/images/{iid}/file", content=small, headers=OCTETS)
    assert r.status_code == 204 and r.headers.get("connection") != "close"
    assert "x-cowfleet-data-plane" not in r.headers
    check_stored(http, iid, small)

    big = os.urandom(9 * MIB + 7)
    iid = create(http, name="chunked")
    pieces = (big[i : i + 1_000_000] for i in range(0, len(big), 1_000_000))
    r = http.put(f"/v2/images/{iid}/file", content=pieces, headers=OCTETS)  # no length
    assert r.status_code == 204 and r.headers.get("connection") != "close"
    assert "x-cowfleet-data-plane" not in r.headers
    check_stored(http, iid, big)


def test_expect_100_continue_from_curl_is_answered(
    image_service: ImageService, http: httpx.Client, tmp_path: Path
) -> None:
    curl = require_program("curl")
    data = os.urandom(6 * MIB)
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    iid = create(http)
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--expect100-timeout",
            "30",  # curl goes ahead after 1 s by default: the test must see the 100
            "-H",
            "Expect: 100-continue",
            "-H",
            f"X-Auth-Token: {image_service.token}",
            "-H",
            "Content-Type: application/octet-stream",
            "-T",
            str(path),
            f"{image_service.url}/v2/images/{iid}/file",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == "204"
    check_stored(http, iid, data)


def test_a_request_pipelined_after_a_direct_upload_is_never_misread(
    image_service: ImageService, http: httpx.Client
) -> None:
    data = os.urandom(4 * MIB)
    iid = create(http)
    head = (
        f"PUT /v2/images/{iid}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {image_service.token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    follow = f"GET /v2/images/{iid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", image_service.port), timeout=30) as s:
        s.sendall(head + data + follow)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 204"), reply[:200]
    assert b"connection: close" in reply.lower()
    # The server closed after the upload; the GET is not answered (nor taken as body).
    assert reply.count(b"HTTP/1.1") == 1
    check_stored(http, iid, data)


def test_a_client_gone_during_a_direct_read_leaves_the_image_queued_and_no_bytes(
    image_service: ImageService, http: httpx.Client
) -> None:
    iid = create(http)
    total = 32 * MIB
    head = (
        f"PUT /v2/images/{iid}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {image_service.token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", image_service.port), timeout=30)
    s.sendall(head + b"\1" * (12 * MIB))
    wait_for(lambda: http.get(f"/v2/images/{iid}").json()["status"] == "saving")
    s.close()
    wait_for(lambda: http.get(f"/v2/images/{iid}").json()["status"] == "queued")
    staging = image_service.data_dir / "staging"
    wait_for(lambda: list(staging.iterdir()) == [])
    assert list((image_service.data_dir / "images").iterdir()) == []
    data = os.urandom(5 * MIB)  # and the image can be uploaded again
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    check_stored(http, iid, data)


def read_response(s: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
    """One response with a Content-Length from ``s`` (``buf``: bytes read beyond it)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, bytes(buf[:200])
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(buf) < end + length:
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed part-way through a body"
        buf += chunk
    body = bytes(buf[end : end + length])
    del buf[: end + length]
    return head, body


def test_downloads_are_sent_by_the_data_plane_and_keep_the_connection(
    image_service: ImageService, http: httpx.Client
) -> None:
    data = os.urandom(40 * MIB + 321)
    iid = create(http)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    auth = f"Host: x\r\nX-Auth-Token: {image_service.token}\r\n"
    # Three requests pipelined on one connection: a whole file, a range, the record.
    requests = (
        f"GET /v2/images/{iid}/file HTTP/1.1\r\n{auth}\r\n"
        f"GET /v2/images/{iid}/file HTTP/1.1\r\n{auth}Range: bytes=1000-2099999\r\n\r\n"
        f"GET /v2/images/{iid} HTTP/1.1\r\n{auth}Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", image_service.port), timeout=30) as s:
        s.sendall(requests)
        buf = bytearray()
        head, body = read_response(s, buf)
        assert head.startswith(b"HTTP/1.1 200 "), head
        # Set only where the data plane wrote the response (sendfile), never by the ASGI path.
        assert b"\r\nx-cowfleet-data-plane: sendfile\r\n" in head.lower()
        assert b"connection: close" not in head.lower()
        assert body == data
        head, body = read_response(s, buf)
        assert head.startswith(b"HTTP/1.1 206 "), head
        assert b"x-cowfleet-data-plane: sendfile" in head.lower()
        assert f"content-range: bytes 1000-2099999/{len(data)}".encode() in head.lower()
        assert body == data[1000:2100000]
        head, body = read_response(s, buf)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"x-cowfleet-data-plane" not in head.lower()
        assert iid.encode() in body
        while chunk := s.recv(65536):  # and nothing else: uvicorn's own head was not sent
            buf += chunk
        assert buf == b""


def test_a_download_to_an_http_1_0_client_is_sent_whole_and_closes(
    image_service: ImageService, http: httpx.Client
) -> None:
    data = os.urandom(3 * MIB + 5)
    iid = create(http)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    auth = f"Host: x\r\nX-Auth-Token: {image_service.token}\r\n"
    with socket.create_connection(("127.0.0.1", image_service.port), timeout=30) as s:
        s.sendall(f"GET /v2/images/{iid}/file HTTP/1.0\r\n{auth}\r\n".encode())
        reply = b""
        while chunk := s.recv(1 << 20):  # the server closes after the one response
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"x-cowfleet-data-plane: sendfile" in head
    assert b"connection: close" in head.lower()
    assert body == data


def test_a_client_gone_during_a_sendfile_download_leaves_the_server_serving(
    image_service: ImageService, http: httpx.Client
) -> None:
    data = os.urandom(64 * MIB)
    iid = create(http)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    auth = f"Host: x\r\nX-Auth-Token: {image_service.token}\r\n"
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", image_service.port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET /v2/images/{iid}/file HTTP/1.1\r\n{auth}\r\n".encode())
        assert b"x-cowfleet-data-plane: sendfile" in s.recv(65536)
        s.close()  # with most of the body not yet read: a reset for the server
    with http.stream("GET", f"/v2/images/{iid}/file") as r:
        assert r.headers["x-cowfleet-data-plane"] == "sendfile"
        assert r.read() == data


# What stays in the page cache ---------------------------------------------------------


def resident(fincore: str, path: Path) -> float:
    """Share of ``path`` in the page cache, as util-linux's fincore reports it."""
    out = subprocess.run(
        [fincore, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    res, size = int(out[0]), int(out[1])
    return res / size


@pytest.fixture
def cache_server(
    direct_io_dir: Path,
) -> Iterator[Callable[..., tuple[ImageService, httpx.Client, str]]]:
    from tests.fixtures.images import start_image_service

    fincore = require_program("fincore")
    # The service's data on a filesystem that takes O_DIRECT (a loop-mounted ext4 when
    # the tmp folder's does not), so the page-cache behaviour is what is tested.
    started: list[tuple[ImageService, httpx.Client]] = []

    def start(**settings: str) -> tuple[ImageService, httpx.Client, str]:
        svc = start_image_service(direct_io_dir / f"svc-{len(started)}", settings=settings)
        client = httpx.Client(base_url=svc.url, headers=svc.headers, timeout=60)
        started.append((svc, client))
        return svc, client, fincore

    yield start
    for svc, client in started:
        client.close()
        svc.stop()


def upload_cold(http: httpx.Client, svc: ImageService, data: bytes) -> tuple[str, Path]:
    iid = create(http)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    return iid, svc.data_dir / "images" / iid


def download(http: httpx.Client, iid: str, data: bytes) -> None:
    with http.stream("GET", f"/v2/images/{iid}/file") as r:
        assert r.status_code == 200
        digest = hashlib.sha512()
        for chunk in r.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha512(data).hexdigest()


def test_uploads_skip_the_page_cache_and_an_image_is_cached_from_its_second_download(
    cache_server: Callable[..., tuple[ImageService, httpx.Client, str]],
) -> None:
    svc, http, fincore = cache_server()
    data = os.urandom(96 * MIB)
    iid, path = upload_cold(http, svc, data)
    assert resident(fincore, path) < 0.05  # written with O_DIRECT
    download(http, iid, data)
    assert resident(fincore, path) < 0.35  # the first download dropped what it read
    download(http, iid, data)
    assert resident(fincore, path) > 0.9  # the second keeps it
    download(http, iid, data)
    assert resident(fincore, path) > 0.9  # and later ones leave it cached


@pytest.mark.parametrize(
    ("settings", "after_first"),
    [
        ({"COWFLEET_IMAGES_CACHE_MIN_USES": "1"}, "kept"),
        ({"COWFLEET_IMAGES_CACHE_MIN_USES": "0"}, "dropped"),
        ({"COWFLEET_IMAGES_DIRECT_IO": "false", "COWFLEET_IMAGES_CACHE_MIN_USES": "1"}, "kept"),
    ],
)
def test_page_cache_settings(
    cache_server: Callable[..., tuple[ImageService, httpx.Client, str]],
    settings: dict[str, Any],
    after_first: str,
) -> None:
    svc, http, fincore = cache_server(**settings)
    data = os.urandom(64 * MIB)
    iid, path = upload_cold(http, svc, data)
    buffered = settings.get("COWFLEET_IMAGES_DIRECT_IO") == "false"
    if not buffered:
        assert resident(fincore, path) < 0.05
    for _ in range(2):
        download(http, iid, data)
        if after_first == "kept":
            assert resident(fincore, path) > 0.9
        else:
            assert resident(fincore, path) < 0.35


def test_disk_full_part_way_through_a_direct_read_is_answered_not_reset(
    tmp_path: Path,
) -> None:
    from tests.fixtures.images import start_image_service

    with small_tmpfs(tmp_path / "small") as small:
        svc = start_image_service(small / "svc")
        try:
            with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=60) as http:
                iid = create(http)
                # A client that sends the whole body before it reads anything (as urllib3
                # does): the server reads and drops the rest after the failure, so sending
                # ends normally and the answer is there to read, not a reset.
                total = 24 * MIB
                head = (
                    f"PUT /v2/images/{iid}/file HTTP/1.1\r\nHost: x\r\n"
                    f"X-Auth-Token: {svc.token}\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Length: {total}\r\n\r\n"
                ).encode()
                with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as s:
                    s.sendall(head + os.urandom(total))
                    reply = b""
                    while chunk := s.recv(65536):
                        reply += chunk
                assert reply.startswith(b"HTTP/1.1 507"), reply[:200]
                assert b"no space left" in reply
                assert http.get(f"/v2/images/{iid}").json()["status"] == "queued"
                assert list((svc.data_dir / "staging").iterdir()) == []
                assert list((svc.data_dir / "images").iterdir()) == []
                data = os.urandom(2 * MIB)  # the service carries on once there is room
                r = http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS)
                assert r.status_code == 204
                check_stored(http, iid, data)
        finally:
            svc.stop()
