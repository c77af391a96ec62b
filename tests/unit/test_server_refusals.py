"""What the image server refuses, as Glance does, so that it never stores what it cannot
send back: invalid text, NUL, deep JSON, format changes past ``queued``, properties over
the quota, and uploads over the in-flight caps (in process, SQLite in tmp)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cowfleet.images.server import create_app
from cowfleet.images.server.slots import UploadSlots
from tests.unit.test_server_api import AUTH, JSON, OCTETS, PATCH, create, settings, upload


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path, property_quota=4))) as c:
        yield c


def raw_json(client: TestClient, method: str, url: str, text: str, headers: Any) -> Any:
    # json= cannot carry a lone surrogate: send the escaped text as it is on the wire.
    return client.request(method, url, content=text.encode(), headers=headers)


BAD_TEXT = [
    '{"name": "x", "prop": "a\\ud800b"}',
    '{"name": "\\udfff"}',
    '{"tags": ["ok", "\\ud83d"]}',
    '{"k\\ud800": "v"}',
    '{"name": "nul\\u0000"}',
    '{"prop": "nul\\u0000"}',
    '{"owner": "\\u0000"}',
]


@pytest.mark.parametrize("body", BAD_TEXT)
def test_invalid_text_on_create_is_400_and_not_stored(client: TestClient, body: str) -> None:
    r = raw_json(client, "POST", "/v2/images", body, JSON)
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["message"] or "NUL" in r.json()["message"]
    r = client.get("/v2/images", headers=AUTH)
    assert r.status_code == 200 and r.json()["images"] == []


@pytest.mark.parametrize(
    "op",
    [
        '{"op": "add", "path": "/prop", "value": "\\ud800"}',
        '{"op": "add", "path": "/name", "value": "\\ud800"}',
        '{"op": "add", "path": "/pr\\ud800op", "value": "v"}',
        '{"op": "add", "path": "/tags", "value": ["\\u0000"]}',
        '{"op": "add", "path": "/prop", "value": "a\\u0000"}',
    ],
)
def test_invalid_text_on_patch_is_400_and_not_stored(client: TestClient, op: str) -> None:
    img = create(client)
    url = f"/v2/images/{img['id']}"
    r = raw_json(client, "PATCH", url, f"[{op}]", PATCH)
    assert r.status_code == 400, r.text
    assert client.get(url, headers=AUTH).json() == img
    assert client.get("/v2/images", headers=AUTH).status_code == 200
    assert client.delete(url, headers=AUTH).status_code == 204


def test_body_that_is_not_utf8_is_400(client: TestClient) -> None:
    for raw in (b'{"name": "\xff"}', b'{"prop": "\xed\xa0\x80"}'):  # the second: UTF-8d surrogate
        r = client.post("/v2/images", content=raw, headers=JSON)
        assert r.status_code == 400, r.text
    assert client.get("/v2/images", headers=AUTH).json()["images"] == []


def test_deep_json_is_400(client: TestClient) -> None:
    for depth in (9, 100_000):
        r = raw_json(client, "POST", "/v2/images", "[" * depth + "]" * depth, JSON)
        assert r.status_code == 400, (depth, r.text)
        assert "nested deeper" in r.json()["message"]
    img = create(client)
    deep = [{"op": "add", "path": "/tags", "value": json.loads("[" * 8 + "]" * 8)}]
    r = client.patch(f"/v2/images/{img['id']}", json=deep, headers=PATCH)
    assert r.status_code == 400 and "nested deeper" in r.json()["message"]
    # What the API needs is well inside the limit.
    ok = [{"op": "add", "path": "/tags", "value": ["a", "b"]}]
    assert client.patch(f"/v2/images/{img['id']}", json=ok, headers=PATCH).status_code == 200


def test_nul_in_a_list_filter_is_400(client: TestClient) -> None:
    r = client.get("/v2/images", params={"name": "a\x00b"}, headers=AUTH)
    assert r.status_code == 400 and "NUL" in r.json()["message"]


@pytest.mark.parametrize("key", ["disk_format", "container_format"])
def test_formats_change_only_while_queued(client: TestClient, key: str) -> None:
    img = create(client)
    url = f"/v2/images/{img['id']}"
    value = "qcow2" if key == "disk_format" else "ovf"
    r = client.patch(
        url, json=[{"op": "replace", "path": f"/{key}", "value": value}], headers=PATCH
    )
    assert r.status_code == 200 and r.json()[key] == value
    back = "raw" if key == "disk_format" else "bare"
    client.patch(url, json=[{"op": "replace", "path": f"/{key}", "value": back}], headers=PATCH)
    assert upload(client, img["id"], b"x" * 4096).status_code == 204
    for new in (value, back, None):  # even the same value, as Glance
        op = [{"op": "replace", "path": f"/{key}", "value": new}]
        r = client.patch(url, json=op, headers=PATCH)
        assert r.status_code == 403, r.text
        assert "queued" in r.json()["message"]
    got = client.get(url, headers=AUTH).json()
    assert got[key] == back and got["status"] == "active"
    # Other attributes of an active image still change.
    r = client.patch(url, json=[{"op": "add", "path": "/name", "value": "n"}], headers=PATCH)
    assert r.status_code == 200


async def _stalled_body(first: bytes, gate: asyncio.Event, rest: bytes) -> AsyncIterator[bytes]:
    yield first
    await gate.wait()
    yield rest


def test_format_change_during_an_upload_is_403_and_the_upload_keeps_its_format(
    tmp_path: Path,
) -> None:
    from tests.unit.hostile_corpus import MIB, qcow2

    app = create_app(settings(tmp_path))

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"name": "i", "disk_format": "raw", "container_format": "bare"}
            iid = (await c.post("/v2/images", headers=AUTH, json=body)).json()["id"]
            url = f"/v2/images/{iid}"
            # qcow2 data declared raw: the check at the end of the upload must judge it
            # against raw (a mismatch, refused), whatever a PATCH tried meanwhile.
            data = qcow2(size=MIB)
            gate = asyncio.Event()
            put = asyncio.create_task(
                c.put(
                    f"{url}/file",
                    content=_stalled_body(data[:512], gate, data[512:]),
                    headers=OCTETS,
                )
            )
            for _ in range(100):
                if (await c.get(url, headers=AUTH)).json()["status"] == "saving":
                    break
                await asyncio.sleep(0.01)
            op = [{"op": "replace", "path": "/disk_format", "value": "qcow2"}]
            r = await c.patch(url, json=op, headers=PATCH)
            assert r.status_code == 403, r.text
            gate.set()
            r = await put
            assert r.status_code == 415, r.text
            got = (await c.get(url, headers=AUTH)).json()
            assert got["disk_format"] == "raw" and got["status"] == "queued"

    asyncio.run(asyncio.wait_for(run(), 20))


def test_property_quota_is_413(client: TestClient) -> None:
    props = {f"p{i}": "v" for i in range(5)}
    r = client.post("/v2/images", json={"name": "q", **props}, headers=AUTH)
    assert r.status_code == 413 and "at most 4 properties" in r.json()["message"]
    assert client.get("/v2/images", headers=AUTH).json()["images"] == []
    img = create(client, **{f"p{i}": "v" for i in range(4)})
    url = f"/v2/images/{img['id']}"
    r = client.patch(url, json=[{"op": "add", "path": "/p9", "value": "v"}], headers=PATCH)
    assert r.status_code == 413
    assert "p9" not in client.get(url, headers=AUTH).json()
    # Replacing, removing, and base attributes do not count against the quota.
    ops = [
        {"op": "replace", "path": "/p0", "value": "w"},
        {"op": "remove", "path": "/p1"},
        {"op": "add", "path": "/min_ram", "value": 5},
    ]
    assert client.patch(url, json=ops, headers=PATCH).status_code == 200


def test_default_property_quota_is_glances_128(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path))) as c:
        many = {f"p{i}": "v" for i in range(128)}
        assert c.post("/v2/images", json={"name": "a", **many}, headers=AUTH).status_code == 201
        many["p128"] = "v"
        assert c.post("/v2/images", json={"name": "b", **many}, headers=AUTH).status_code == 413


def test_upload_slots_count_per_key_and_in_total() -> None:
    slots = UploadSlots(total=3, per_key=2)
    with slots.hold("a", "i1"), slots.hold("a", "i2"):
        with pytest.raises(Exception) as exc, slots.hold("a", "i3"):
            pass
        assert "with this token" in str(exc.value)
        with slots.hold("b", "i4"):
            with pytest.raises(Exception) as exc, slots.hold("c", "i5"):
                pass
            assert "on this server" in str(exc.value)
        assert slots.in_flight == 2
    assert slots.in_flight == 0
    with slots.hold("a", "i6"):
        assert slots.in_flight == 1


def test_uploads_over_the_caps_get_503_with_retry_after(tmp_path: Path) -> None:
    # No token check in this app, so that several tokens can be told apart.
    st = settings(tmp_path, max_uploads=3, max_uploads_per_token=2)
    app = create_app(type(st)(**{**st.__dict__, "token": None}))

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

            async def new_image() -> str:
                body = {"name": "i", "disk_format": "raw", "container_format": "bare"}
                iid: str = (await c.post("/v2/images", json=body)).json()["id"]
                return iid

            gate = asyncio.Event()

            def start(iid: str, token: str) -> asyncio.Task[httpx.Response]:
                headers = {**OCTETS, "X-Auth-Token": token}
                body = _stalled_body(b"x" * 1000, gate, b"y" * 1000)
                return asyncio.create_task(
                    c.put(f"/v2/images/{iid}/file", content=body, headers=headers)
                )

            async def saving(n: int) -> None:
                for _ in range(200):
                    listing = (await c.get("/v2/images", params={"status": "saving"})).json()
                    if len(listing["images"]) == n:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"{n} uploads never started")

            held = [start(await new_image(), "alice"), start(await new_image(), "alice")]
            await saving(2)
            iid = await new_image()
            r = await c.put(
                f"/v2/images/{iid}/file", content=b"z", headers={**OCTETS, "X-Auth-Token": "alice"}
            )
            assert r.status_code == 503 and r.headers["retry-after"].isdigit()
            assert "with this token" in r.json()["message"]
            held.append(start(await new_image(), "bob"))
            await saving(3)
            r = await c.put(
                f"/v2/images/{iid}/file", content=b"z", headers={**OCTETS, "X-Auth-Token": "carol"}
            )
            assert r.status_code == 503 and r.headers["retry-after"].isdigit()
            assert "on this server" in r.json()["message"]
            assert (await c.get(f"/v2/images/{iid}")).json()["status"] == "queued"
            gate.set()
            assert [(await t).status_code for t in held] == [204, 204, 204]
            # Slots are given back: the refused upload now goes through.
            r = await c.put(
                f"/v2/images/{iid}/file", content=b"z", headers={**OCTETS, "X-Auth-Token": "alice"}
            )
            assert r.status_code == 204

    asyncio.run(asyncio.wait_for(run(), 20))


def test_an_image_stored_with_invalid_text_before_the_fix_can_be_listed_and_deleted(
    tmp_path: Path,
) -> None:
    app = create_app(settings(tmp_path))
    svc = app.state.service
    iid = "6f1c1c0e-5d0a-4a55-9a43-8a0d1b1f0c12"
    # Written as a server without the checks did (straight into the catalog; the
    # JSON columns take such text, SQLite's text columns do not).
    svc.catalog.create(iid, fields={"name": "old"}, properties={"p": "\udfff"}, tags=("\ud800",))
    with TestClient(app) as c:
        r = c.get(f"/v2/images/{iid}", headers=AUTH)
        assert r.status_code == 200 and r.json()["p"] == "\udfff"
        assert b'"p":"\\udfff"' in r.content and r.json()["tags"] == ["\ud800"]
        r = c.get("/v2/images", headers=AUTH)
        assert r.status_code == 200 and [i["id"] for i in r.json()["images"]] == [iid]
        ops = [{"op": "remove", "path": "/p"}, {"op": "replace", "path": "/tags", "value": []}]
        r = c.patch(f"/v2/images/{iid}", json=ops, headers=PATCH)
        assert r.status_code == 200 and r.json()["tags"] == [] and "p" not in r.json()
        assert c.delete(f"/v2/images/{iid}", headers=AUTH).status_code == 204
