"""The image server's HTTP API, in process (Starlette's TestClient, SQLite in tmp)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cowfleet.images.server import ServerSettings, create_app
from tests.unit.hostile_corpus import MIB, qcow2

TOKEN = "unit-test-token"
AUTH = {"X-Auth-Token": TOKEN}
JSON = {**AUTH, "Content-Type": "application/json"}
OCTETS = {**AUTH, "Content-Type": "application/octet-stream"}
PATCH = {**AUTH, "Content-Type": "application/openstack-images-v2.1-json-patch"}
MISSING = "6f1c1c0e-5d0a-4a55-9a43-8a0d1b1f0c11"


def settings(tmp: Path, **kw: Any) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'c.sqlite'}",
        token=TOKEN,
        upload_block=64 * 1024,
        **kw,
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path, max_image_size=8 * MIB))) as c:
        yield c


def create(client: TestClient, **fields: Any) -> dict[str, Any]:
    body = {"name": "img", "disk_format": "raw", "container_format": "bare", **fields}
    r = client.post("/v2/images", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def upload(client: TestClient, image_id: str, data: bytes) -> Any:
    return client.put(f"/v2/images/{image_id}/file", content=data, headers=OCTETS)


def test_create_returns_a_queued_glance_image(client: TestClient) -> None:
    img = create(client, min_ram=512, os_type="linux", kernel_id="k")
    assert img["status"] == "queued"
    assert img["min_ram"] == 512 and img["min_disk"] == 0
    assert img["os_type"] == "linux" and img["kernel_id"] == "k"
    assert img["self"] == f"/v2/images/{img['id']}"
    assert img["file"] == f"/v2/images/{img['id']}/file"
    assert img["schema"] == "/v2/schemas/image"
    assert img["created_at"].endswith("Z") and len(img["created_at"]) == 20
    assert img["visibility"] == "shared" and img["protected"] is False and img["tags"] == []
    assert client.get(f"/v2/images/{img['id']}", headers=AUTH).json() == img


def test_token_is_required(client: TestClient) -> None:
    assert client.get("/v2/images").status_code == 401
    assert client.get("/v2/images", headers={"X-Auth-Token": "wrong"}).status_code == 401
    r = client.post("/v2/images", json={"name": "x"}, headers={"X-Auth-Token": TOKEN + "x"})
    assert r.status_code == 401
    assert client.get("/v2/images", headers=AUTH).json()["images"] == []
    assert client.get("/versions").status_code == 200  # discovery stays open


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"status": "active"}, 403),
        ({"size": 5}, 403),
        ({"checksum": "x"}, 403),
        ({"self": "/x"}, 403),
        ({"location": "file:///etc/passwd"}, 403),
        ({"os_glance_foo": "x"}, 403),
        ({"name": "x" * 256}, 400),
        ({"min_disk": -1}, 400),
        ({"min_ram": 10**12}, 400),
        ({"min_disk": "1"}, 400),
        ({"disk_format": "exe"}, 400),
        ({"container_format": "zip"}, 400),
        ({"visibility": "everyone"}, 400),
        ({"protected": "no"}, 400),
        ({"id": "not-a-uuid"}, 400),
        ({"some_prop": 5}, 400),
        ({"tags": "a"}, 400),
        ([], 400),
    ],
)
def test_bad_create_bodies(client: TestClient, body: Any, status: int) -> None:
    r = client.post("/v2/images", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert r.json()["code"] == status and r.json()["message"]
    assert client.get("/v2/images", headers=AUTH).json()["images"] == []


def test_malformed_json_and_wrong_content_type(client: TestClient) -> None:
    r = client.post("/v2/images", content=b"{not json", headers=JSON)
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = client.post(
        "/v2/images",
        content=b"name=x",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415


def test_create_with_chosen_id_and_duplicate(client: TestClient) -> None:
    img = create(client, id=MISSING.upper())
    assert img["id"] == MISSING
    r = client.post("/v2/images", json={"id": MISSING}, headers=AUTH)
    assert r.status_code == 409


def test_unknown_and_malformed_ids_are_404(client: TestClient) -> None:
    for path in (f"/v2/images/{MISSING}", "/v2/images/nope", f"/v2/images/{MISSING}/file"):
        assert client.get(path, headers=AUTH).status_code == 404
    assert client.delete("/v2/images/../../etc", headers=AUTH).status_code == 404
    assert upload(client, "not-a-uuid", b"x").status_code == 404


def test_upload_raw_computes_hashes_and_sizes(client: TestClient) -> None:
    data = bytes(range(256)) * 4096 * 3  # 3 MiB: several upload blocks
    img = create(client)
    assert upload(client, img["id"], data).status_code == 204
    got = client.get(f"/v2/images/{img['id']}", headers=AUTH).json()
    assert got["status"] == "active"
    assert got["size"] == got["virtual_size"] == len(data)
    assert got["checksum"] == hashlib.md5(data).hexdigest()
    assert got["os_hash_algo"] == "sha512"
    assert got["os_hash_value"] == hashlib.sha512(data).hexdigest()
    r = client.get(f"/v2/images/{img['id']}/file", headers=AUTH)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-md5"] == got["checksum"]
    assert r.headers["content-length"] == str(len(data))
    assert upload(client, img["id"], data).status_code == 409  # already active


def test_upload_qcow2_reports_virtual_size(client: TestClient) -> None:
    data = qcow2(size=64 * MIB)
    img = create(client, disk_format="qcow2")
    assert upload(client, img["id"], data).status_code == 204
    got = client.get(f"/v2/images/{img['id']}", headers=AUTH).json()
    assert got["virtual_size"] == 64 * MIB and got["size"] == len(data)


@pytest.mark.parametrize(
    ("declared", "data", "reason"),
    [
        ("raw", qcow2(), "format-mismatch"),
        ("qcow2", b"\0" * 65536, "format-mismatch"),
        ("qcow2", qcow2(backing=b"/etc/passwd"), "backing-file"),
        ("qcow2", qcow2(data_file=b"/dev/sda", incompat=4), "data-file"),
    ],
)
def test_unsafe_or_mismatched_data_is_415_and_stays_queued(
    client: TestClient, tmp_path: Path, declared: str, data: bytes, reason: str
) -> None:
    img = create(client, disk_format=declared)
    r = upload(client, img["id"], data)
    assert r.status_code == 415, r.text
    assert reason in r.json()["message"]
    got = client.get(f"/v2/images/{img['id']}", headers=AUTH).json()
    assert got["status"] == "queued" and got["size"] is None
    assert list((tmp_path / "data" / "staging").iterdir()) == []
    assert list((tmp_path / "data" / "images").iterdir()) == []
    assert client.get(f"/v2/images/{img['id']}/file", headers=AUTH).status_code == 204


def test_upload_over_the_cap_is_413(client: TestClient, tmp_path: Path) -> None:
    img = create(client)
    big = b"\1" * (8 * MIB + 1)
    assert upload(client, img["id"], big).status_code == 413

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to refuse early
        for _ in range(9):
            yield b"\2" * MIB

    r = client.put(f"/v2/images/{img['id']}/file", content=chunks(), headers=OCTETS)
    assert r.status_code == 413
    assert client.get(f"/v2/images/{img['id']}", headers=AUTH).json()["status"] == "queued"
    assert list((tmp_path / "data" / "staging").iterdir()) == []
    assert upload(client, img["id"], b"\3" * MIB).status_code == 204  # still uploadable


def test_upload_needs_octet_stream_and_formats(client: TestClient) -> None:
    img = create(client)
    r = client.put(
        f"/v2/images/{img['id']}/file", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert r.status_code == 415
    bare = client.post("/v2/images", json={"name": "noformat"}, headers=AUTH).json()
    assert upload(client, bare["id"], b"x" * 1024).status_code == 400


def test_download_ranges(client: TestClient) -> None:
    data = bytes(range(256)) * 40
    img = create(client)
    assert upload(client, img["id"], data).status_code == 204
    url = f"/v2/images/{img['id']}/file"
    md5 = hashlib.md5(data).hexdigest()
    for header, first, last in (
        ("bytes=0-9", 0, 9),
        ("bytes=100-", 100, len(data) - 1),
        ("bytes=-16", len(data) - 16, len(data) - 1),
    ):
        r = client.get(url, headers={**AUTH, "Range": header})
        assert r.status_code == 206
        assert r.content == data[first : last + 1]
        assert r.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
        assert r.headers["content-md5"] == md5  # whole image's md5, like Glance
    r = client.get(url, headers={**AUTH, "Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    assert client.get(url, headers={**AUTH, "Range": "bytes=0-1,4-5"}).status_code == 400


def test_queued_image_file_is_204(client: TestClient) -> None:
    img = create(client)
    r = client.get(f"/v2/images/{img['id']}/file", headers=AUTH)
    assert r.status_code == 204 and r.content == b""


def test_delete_and_protected(client: TestClient, tmp_path: Path) -> None:
    img = create(client, protected=True)
    assert upload(client, img["id"], b"x" * 4096).status_code == 204
    assert client.delete(f"/v2/images/{img['id']}", headers=AUTH).status_code == 403
    r = client.patch(
        f"/v2/images/{img['id']}",
        headers=PATCH,
        json=[{"op": "replace", "path": "/protected", "value": False}],
    )
    assert r.status_code == 200 and r.json()["protected"] is False
    assert client.delete(f"/v2/images/{img['id']}", headers=AUTH).status_code == 204
    assert client.get(f"/v2/images/{img['id']}", headers=AUTH).status_code == 404
    assert client.delete(f"/v2/images/{img['id']}", headers=AUTH).status_code == 404
    assert list((tmp_path / "data" / "images").iterdir()) == []


def test_patch(client: TestClient) -> None:
    img = create(client, os_type="linux")
    url = f"/v2/images/{img['id']}"
    r = client.patch(
        url,
        headers=PATCH,
        json=[
            {"op": "replace", "path": "/name", "value": "renamed"},
            {"op": "add", "path": "/ramdisk_id", "value": "r"},
            {"op": "remove", "path": "/os_type"},
            {"op": "add", "path": "/min_disk", "value": 4},
        ],
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["name"] == "renamed" and got["ramdisk_id"] == "r" and got["min_disk"] == 4
    assert "os_type" not in got
    assert client.get(url, headers=AUTH).json() == got
    bad = [{"op": "replace", "path": "/status", "value": "active"}]
    assert client.patch(url, headers=PATCH, json=bad).status_code == 403
    r = client.patch(url, json=[{"op": "add", "path": "/a", "value": "b"}], headers=AUTH)
    assert r.status_code == 415  # plain application/json is not a JSON-patch
    r = client.patch(url, headers=PATCH, json=[{"op": "remove", "path": "/nothing"}])
    assert r.status_code == 409
    r = client.patch(f"/v2/images/{MISSING}", headers=PATCH, json=[])
    assert r.status_code == 404


def test_list_pages_sorts_and_filters(client: TestClient) -> None:
    ids = [
        create(client, name=f"n{i % 3}", disk_format="iso" if i % 2 else "raw")["id"]
        for i in range(7)
    ]
    seen: list[str] = []
    url: str | None = "/v2/images?limit=3&sort_key=name&sort_dir=asc"
    pages = 0
    while url:
        body = client.get(url, headers=AUTH).json()
        seen += [i["id"] for i in body["images"]]
        assert body["schema"] == "/v2/schemas/images" and body["first"].startswith("/v2/images")
        url = body.get("next")
        pages += 1
    assert sorted(seen) == sorted(ids) and pages == 3
    names = [client.get(f"/v2/images/{i}", headers=AUTH).json()["name"] for i in seen]
    assert names == sorted(names)
    isos = client.get("/v2/images?disk_format=iso&limit=100", headers=AUTH).json()["images"]
    assert len(isos) == 3 and all(i["disk_format"] == "iso" for i in isos)
    named = client.get("/v2/images?name=n1", headers=AUTH).json()["images"]
    assert {i["name"] for i in named} == {"n1"} and len(named) == 2
    for query in (
        "limit=-1",
        "limit=x",
        "sort_key=checksum",
        "sort_dir=up",
        "marker=bad",
        f"marker={MISSING}",
    ):
        assert client.get(f"/v2/images?{query}", headers=AUTH).status_code == 400, query


def test_schemas_and_versions(client: TestClient) -> None:
    schema = client.get("/v2/schemas/image", headers=AUTH).json()
    assert schema["name"] == "image" and "disk_format" in schema["properties"]
    listing = client.get("/v2/schemas/images", headers=AUTH).json()
    assert listing["properties"]["images"]["items"]["name"] == "image"
    assert client.get("/versions").json()["versions"][0]["status"] == "CURRENT"
    assert "/v2/images/{image_id}/file" in client.get("/openapi.json").json()["paths"]


def test_restart_resets_saving_and_cleans_staging(tmp_path: Path) -> None:
    st = settings(tmp_path)
    with TestClient(create_app(st)) as c:
        img = create(c)
        c.app.state.service.catalog.claim_upload(img["id"])  # type: ignore[attr-defined]
    leftover = st.staging_dir / f"{img['id']}.abc.part"
    leftover.write_bytes(b"half")
    with TestClient(create_app(st)) as c:
        assert c.get(f"/v2/images/{img['id']}", headers=AUTH).json()["status"] == "queued"
        assert not leftover.exists()
        assert upload(c, img["id"], b"x" * 1024).status_code == 204


def test_stalled_upload_is_dropped_after_the_idle_timeout(tmp_path: Path) -> None:
    import asyncio

    import httpx

    from cowfleet.images.server.api import Service

    app = create_app(settings(tmp_path, upload_idle_timeout=0.2))
    svc: Service = app.state.service

    async def run() -> None:
        async def stalling() -> Any:
            yield b"x" * 100_000
            await asyncio.sleep(5)  # the client stops sending
            yield b"never"

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post(
                "/v2/images",
                headers=AUTH,
                json={"name": "slow", "disk_format": "raw", "container_format": "bare"},
            )
            iid = r.json()["id"]
            r = await c.put(f"/v2/images/{iid}/file", content=stalling(), headers=OCTETS)
            assert r.status_code == 408
            r = await c.get(f"/v2/images/{iid}", headers=AUTH)
            assert r.json()["status"] == "queued"

    asyncio.run(asyncio.wait_for(run(), 4))
    assert list(svc.store.staging_dir.iterdir()) == []
