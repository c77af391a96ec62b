"""The real image server (``cowfleet serve images`` subprocess) over loopback HTTP."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require_env
from tests.fixtures.images import ImageService
from tests.unit.hostile_corpus import MIB, qcow2

pytestmark = pytest.mark.integration

OCTETS = {"Content-Type": "application/octet-stream"}
PATCH = {"Content-Type": "application/openstack-images-v2.1-json-patch"}


@pytest.fixture
def http(image_service: ImageService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=image_service.url, headers=image_service.headers, timeout=30) as c:
        yield c


def create(http: httpx.Client, **fields: Any) -> str:
    body = {"name": "img", "disk_format": "raw", "container_format": "bare", **fields}
    r = http.post("/v2/images", json=body)
    assert r.status_code == 201, r.text
    image_id: str = r.json()["id"]
    return image_id


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def staging_files(svc: ImageService) -> list[str]:
    return sorted(p.name for p in (svc.data_dir / "staging").iterdir())


def raw_partial_upload(svc: ImageService, image_id: str, total: int, send: bytes) -> socket.socket:
    """Start an upload announcing ``total`` bytes and send only ``send``; socket left open."""
    s = socket.create_connection(("127.0.0.1", svc.port))
    head = (
        f"PUT /v2/images/{image_id}/file HTTP/1.1\r\nHost: x\r\n"
        f"X-Auth-Token: {svc.token}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {total}\r\n\r\n"
    ).encode()
    s.sendall(head + send)
    return s


def test_token_file_is_created_private(image_service: ImageService) -> None:
    mode = stat.S_IMODE(image_service.token_file.stat().st_mode)
    assert mode == 0o600
    assert len(image_service.token) >= 32


def test_auth_is_required(image_service: ImageService) -> None:
    url = f"{image_service.url}/v2/images"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-Auth-Token": "nope"}).status_code == 401
    assert httpx.post(url, json={"name": "x"}).status_code == 401
    assert httpx.get(url, headers=image_service.headers).json()["images"] == []


def test_bad_input_gets_clear_4xx_and_stores_nothing(
    image_service: ImageService, http: httpx.Client
) -> None:
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        (
            "POST",
            "/v2/images",
            {"content": b"{oops", "headers": {"Content-Type": "application/json"}},
            400,
        ),
        ("POST", "/v2/images", {"json": {"status": "active"}}, 403),
        ("POST", "/v2/images", {"json": {"name": "n" * 256}}, 400),
        ("POST", "/v2/images", {"json": {"min_disk": -5}}, 400),
        ("POST", "/v2/images", {"json": {"min_ram": 2**63}}, 400),
        (
            "POST",
            "/v2/images",
            {"content": b"name=x", "headers": {"Content-Type": "text/plain"}},
            415,
        ),
        ("GET", "/v2/images/not-a-uuid", {}, 404),
        ("GET", "/v2/images/00000000-0000-0000-0000-000000000000", {}, 404),
        ("DELETE", "/v2/images/00000000-0000-0000-0000-000000000000", {}, 404),
        ("GET", "/v2/images?limit=-3", {}, 400),
        ("GET", "/v2/images?sort_key=os_hash_value", {}, 400),
    ]
    for method, path, kw, status in cases:
        r = http.request(method, path, **kw)
        assert r.status_code == status, (method, path, r.text)
        assert r.json()["message"]
    assert http.get("/v2/images").json()["images"] == []
    assert staging_files(image_service) == []


def test_upload_download_range_md5(http: httpx.Client) -> None:
    data = os.urandom(3 * MIB + 123)
    iid = create(http)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    img = http.get(f"/v2/images/{iid}").json()
    assert img["status"] == "active" and img["size"] == len(data)
    assert img["checksum"] == hashlib.md5(data).hexdigest()
    assert img["os_hash_value"] == hashlib.sha512(data).hexdigest()
    r = http.get(f"/v2/images/{iid}/file")
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-md5"] == img["checksum"]
    r = http.get(f"/v2/images/{iid}/file", headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206 and r.content == data[1000:2000]
    assert r.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    assert r.headers["content-md5"] == img["checksum"]
    r = http.get(f"/v2/images/{iid}/file", headers={"Range": "bytes=-5"})
    assert r.content == data[-5:]
    assert (
        http.get(f"/v2/images/{iid}/file", headers={"Range": f"bytes={len(data)}-"}).status_code
        == 416
    )
    assert http.get(f"/v2/images/{iid}/file", headers={"Range": "bytes=0-1,3-4"}).status_code == 400


def test_chunked_upload_of_qcow2(http: httpx.Client) -> None:
    data = qcow2(size=100 * MIB)
    iid = create(http, disk_format="qcow2")

    def gen() -> Iterator[bytes]:
        for i in range(0, len(data), 10_000):
            yield data[i : i + 10_000]

    r = http.put(f"/v2/images/{iid}/file", content=gen(), headers=OCTETS)
    assert r.status_code == 204, r.text
    img = http.get(f"/v2/images/{iid}").json()
    assert img["virtual_size"] == 100 * MIB and img["size"] == len(data)


def test_hostile_image_is_refused_with_the_reason(
    image_service: ImageService, http: httpx.Client
) -> None:
    iid = create(http, disk_format="raw")
    r = http.put(f"/v2/images/{iid}/file", content=qcow2(backing=b"/etc/shadow"), headers=OCTETS)
    assert r.status_code == 415
    assert "format-mismatch" in r.json()["message"] and "backing-file" in r.json()["message"]
    assert http.get(f"/v2/images/{iid}").json()["status"] == "queued"
    assert staging_files(image_service) == []
    assert list((image_service.data_dir / "images").iterdir()) == []


def test_aborted_upload_leaves_image_queued_and_no_bytes(
    image_service: ImageService, http: httpx.Client
) -> None:
    iid = create(http)
    s = raw_partial_upload(image_service, iid, 8 * MIB, b"\1" * (5 * MIB))
    wait_for(lambda: http.get(f"/v2/images/{iid}").json()["status"] == "saving")
    s.close()  # client gone mid-body
    wait_for(lambda: http.get(f"/v2/images/{iid}").json()["status"] == "queued")
    wait_for(lambda: staging_files(image_service) == [])
    assert list((image_service.data_dir / "images").iterdir()) == []
    data = b"\2" * MIB  # the image can still be uploaded afterwards
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204


def test_second_upload_of_the_same_image_gets_409(
    image_service: ImageService, http: httpx.Client
) -> None:
    iid = create(http)
    total = 2 * MIB
    s = raw_partial_upload(image_service, iid, total, b"\5" * MIB)
    try:
        wait_for(lambda: http.get(f"/v2/images/{iid}").json()["status"] == "saving")
        r = http.put(f"/v2/images/{iid}/file", content=b"\6" * 100, headers=OCTETS)
        assert r.status_code == 409
        s.sendall(b"\5" * (total - MIB))
        reply = s.recv(200)
        assert reply.startswith(b"HTTP/1.1 204")
    finally:
        s.close()
    img = http.get(f"/v2/images/{iid}").json()
    assert img["checksum"] == hashlib.md5(b"\5" * total).hexdigest()


def test_concurrent_uploads_of_different_images(http: httpx.Client) -> None:
    blobs = {create(http, name=f"c{i}"): os.urandom(2 * MIB + i) for i in range(4)}
    codes: dict[str, int] = {}

    def put(iid: str, data: bytes) -> None:
        codes[iid] = http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code

    threads = [threading.Thread(target=put, args=item) for item in blobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes.values()) == {204}
    for iid, data in blobs.items():
        assert http.get(f"/v2/images/{iid}").json()["checksum"] == hashlib.md5(data).hexdigest()
        assert http.get(f"/v2/images/{iid}/file").content == data


def test_delete_during_download_finishes_the_download(
    image_service: ImageService, http: httpx.Client
) -> None:
    data = os.urandom(24 * MIB)
    iid = create(http)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    got = bytearray()
    with http.stream("GET", f"/v2/images/{iid}/file") as r:
        it = r.iter_bytes(64 * 1024)
        got += next(it)
        assert http.delete(f"/v2/images/{iid}").status_code == 204
        for chunk in it:
            got += chunk
    assert bytes(got) == data
    assert http.get(f"/v2/images/{iid}").status_code == 404
    assert list((image_service.data_dir / "images").iterdir()) == []
    assert http.get("/versions").status_code == 200  # still serving


def test_restart_keeps_images_and_metadata(image_service: ImageService, http: httpx.Client) -> None:
    data = os.urandom(MIB)
    iid = create(http, os_type="linux", min_ram=256, protected=True)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    queued = create(http, name="still-queued")
    before = {i["id"]: i for i in http.get("/v2/images").json()["images"]}
    image_service.stop()
    image_service.start()
    after = {i["id"]: i for i in http.get("/v2/images").json()["images"]}
    assert after == before
    assert after[queued]["status"] == "queued"
    assert http.get(f"/v2/images/{iid}/file").content == data


def test_killed_mid_upload_recovers_on_start(
    image_service: ImageService, http: httpx.Client
) -> None:
    iid = create(http)
    s = raw_partial_upload(image_service, iid, 16 * MIB, b"\7" * (6 * MIB))
    wait_for(lambda: http.get(f"/v2/images/{iid}").json()["status"] == "saving")
    wait_for(lambda: staging_files(image_service) != [])
    os.kill(image_service.pid, signal.SIGKILL)
    image_service.proc.wait()  # type: ignore[union-attr]
    s.close()
    image_service.proc = None
    image_service.start()
    assert http.get(f"/v2/images/{iid}").json()["status"] == "queued"
    assert staging_files(image_service) == []


def test_patch_over_http(http: httpx.Client) -> None:
    iid = create(http, kernel_id="k1")
    r = http.patch(
        f"/v2/images/{iid}",
        headers=PATCH,
        json=[
            {"op": "replace", "path": "/kernel_id", "value": "k2"},
            {"op": "add", "path": "/visibility", "value": "public"},
        ],
    )
    assert r.status_code == 200 and r.json()["kernel_id"] == "k2"
    assert http.get("/v2/images?visibility=public").json()["images"][0]["id"] == iid
    r = http.patch(
        f"/v2/images/{iid}",
        headers=PATCH,
        json=[{"op": "add", "path": "/virtual_size", "value": 1}],
    )
    assert r.status_code == 403


def test_postgresql_catalog_survives_restart(
    image_service_factory: Callable[..., ImageService],
) -> None:
    url = require_env("COWFLEET_TEST_POSTGRES_URL")
    svc = image_service_factory(database=url)
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as http:
        iid = create(http, name="pg-image")
        assert (
            http.put(f"/v2/images/{iid}/file", content=b"p" * 4096, headers=OCTETS).status_code
            == 204
        )
        svc.stop()
        svc.start()
        img = http.get(f"/v2/images/{iid}").json()
        assert img["status"] == "active" and img["name"] == "pg-image"
        assert http.delete(f"/v2/images/{iid}").status_code == 204


def test_sigterm_stops_gracefully_with_status_0(image_service: ImageService) -> None:
    proc = image_service.proc
    assert proc is not None
    image_service.stop()  # SIGTERM
    assert proc.returncode == 0
    assert "image service on http://127.0.0.1:" in image_service.log_path.read_text()


def test_client_leaving_mid_download_releases_the_file(
    image_service: ImageService, http: httpx.Client
) -> None:
    data = os.urandom(32 * MIB)
    iid = create(http)
    assert http.put(f"/v2/images/{iid}/file", content=data, headers=OCTETS).status_code == 204
    image_path = image_service.data_dir / "images" / iid

    def open_count() -> int:
        fds = Path(f"/proc/{image_service.pid}/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(image_path))

    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", image_service.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(
            f"GET /v2/images/{iid}/file HTTP/1.1\r\nHost: x\r\n"
            f"X-Auth-Token: {image_service.token}\r\n\r\n".encode()
        )
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.close()  # gone with most of the body unsent
    wait_for(lambda: open_count() == 0)
    assert http.get(f"/v2/images/{iid}/file").content == data
