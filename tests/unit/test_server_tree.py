"""The image service's hash tree: computed in the upload pass, stored beside the image,
published as read-only properties, served at /tree; the client's get_tree checks it."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cowfleet.errors import ConflictError, IntegrityError, RemoteError
from cowfleet.hashtree import (
    DEFAULT_LEAF_SIZE,
    LEAF_SIZE_PROPERTY,
    ROOT_PROPERTY,
    TreeVerifier,
    tree_of,
)
from cowfleet.images.client import ImageClient
from cowfleet.images.models import Image
from cowfleet.images.server import create_app
from cowfleet.images.server.catalog import Catalog
from cowfleet.images.server.store import FilesystemStore, orphans
from cowfleet.images.server.upload import BlockPool, UploadPipeline
from tests.unit.test_server_api import AUTH, MIB, PATCH, create, settings, upload

DATA = os.urandom(2 * DEFAULT_LEAF_SIZE + 12345)  # two whole leaves and a short one


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path, max_image_size=16 * MIB))) as c:
        yield c


def test_upload_publishes_the_tree_and_serves_its_leaves(
    client: TestClient, tmp_path: Path
) -> None:
    iid = create(client)["id"]
    assert upload(client, iid, DATA).status_code == 204
    img = client.get(f"/v2/images/{iid}", headers=AUTH).json()
    want = tree_of(DATA)
    assert img[ROOT_PROPERTY] == want.root
    assert img[LEAF_SIZE_PROPERTY] == str(DEFAULT_LEAF_SIZE)
    r = client.get(f"/v2/images/{iid}/tree", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == want.leaves and len(r.content) == 3 * 32
    v = TreeVerifier(img[ROOT_PROPERTY], DEFAULT_LEAF_SIZE, img["size"], r.content)
    v.update(client.get(f"/v2/images/{iid}/file", headers=AUTH).content)
    v.finish()
    # Stored beside the image, private like it.
    leaf_file = tmp_path / "data" / "images" / f"{iid}.tree"
    assert leaf_file.read_bytes() == want.leaves
    assert leaf_file.stat().st_mode & 0o777 == 0o600
    # Listed images carry the properties too.
    listed = client.get("/v2/images", headers=AUTH).json()["images"]
    assert listed[0][ROOT_PROPERTY] == want.root
    # Deleting the image deletes its leaf list.
    assert client.delete(f"/v2/images/{iid}", headers=AUTH).status_code == 204
    assert not leaf_file.exists()
    assert client.get(f"/v2/images/{iid}/tree", headers=AUTH).status_code == 404


@pytest.mark.parametrize("key", [ROOT_PROPERTY, LEAF_SIZE_PROPERTY])
def test_tree_properties_are_read_only(client: TestClient, key: str) -> None:
    iid = create(client)["id"]
    assert upload(client, iid, DATA[:1000]).status_code == 204
    before = client.get(f"/v2/images/{iid}", headers=AUTH).json()
    for op in (
        {"op": "replace", "path": f"/{key}", "value": "0" * 64},
        {"op": "add", "path": f"/{key}", "value": "1"},
        {"op": "remove", "path": f"/{key}"},
    ):
        r = client.patch(f"/v2/images/{iid}", json=[op], headers=PATCH)
        assert r.status_code == 403, (op, r.text)
        assert "read-only" in r.json()["message"]
    assert client.get(f"/v2/images/{iid}", headers=AUTH).json() == before
    r = client.post("/v2/images", json={"name": "x", key: "1"}, headers=AUTH)
    assert r.status_code == 403


def test_tree_of_a_queued_image_is_409_and_of_an_unknown_one_404(client: TestClient) -> None:
    iid = create(client)["id"]
    r = client.get(f"/v2/images/{iid}/tree", headers=AUTH)
    assert r.status_code == 409 and "queued" in r.json()["message"]
    assert client.get(f"/v2/images/{uuid.uuid4()}/tree", headers=AUTH).status_code == 404
    assert client.get(f"/v2/images/{iid}/tree").status_code == 401


def test_image_uploaded_before_trees_has_none(tmp_path: Path) -> None:
    """A catalog written before this change (no tree columns) is migrated in place; its
    images publish no tree and /tree is 404; a free-form property cannot fake one."""
    db = tmp_path / "c.sqlite"
    st = settings(tmp_path)
    with TestClient(create_app(st)) as c:
        iid = create(c)["id"]
        assert upload(c, iid, b"old" * 1000).status_code == 204
    # Make it look like an older version's catalog and store.
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE images DROP COLUMN tree_sha256")
        conn.execute("ALTER TABLE images DROP COLUMN tree_leaf_size")
        conn.execute(
            "UPDATE images SET properties = ? WHERE id = ?",
            (f'{{"{ROOT_PROPERTY}": "{"0" * 64}"}}', iid),
        )
    (st.images_dir / f"{iid}.tree").unlink()
    with TestClient(create_app(st)) as c:
        img = c.get(f"/v2/images/{iid}", headers=AUTH).json()
        assert ROOT_PROPERTY not in img and LEAF_SIZE_PROPERTY not in img
        assert c.get(f"/v2/images/{iid}/tree", headers=AUTH).status_code == 404
        assert c.get(f"/v2/images/{iid}/file", headers=AUTH).content == b"old" * 1000
        # New uploads get trees in the migrated catalog.
        new = create(c)["id"]
        assert upload(c, new, b"new").status_code == 204
        assert c.get(f"/v2/images/{new}", headers=AUTH).json()[ROOT_PROPERTY] == (
            tree_of(b"new").root
        )
    cols = {row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(images)")}
    assert {"tree_sha256", "tree_leaf_size"} <= cols


def test_reconcile_keeps_leaf_lists_of_active_images_only() -> None:
    a, b = "a" * 8, "b" * 8
    entries = [(a, 0.0), (f"{a}.tree", 0.0), (f"{b}.tree", 0.0), ("x.tree.tree", 0.0)]
    assert orphans(entries, {a}, grace=10, now=100) == [f"{b}.tree", "x.tree.tree"]
    assert orphans(entries, set(), grace=10, now=100) == sorted(n for n, _ in entries)


def test_pipeline_tree_does_not_depend_on_block_or_piece_size(tmp_path: Path) -> None:
    import asyncio

    store = FilesystemStore(tmp_path / "images", tmp_path / "staging")
    data = DATA[: DEFAULT_LEAF_SIZE + 100_000]
    for block, piece in ((64 * 1024, 1000), (3 * 1024 * 1024, 65536)):
        staged = store.begin_write(str(uuid.uuid4()))

        async def run(pipe: UploadPipeline, piece: int = piece) -> Any:
            for i in range(0, len(data), piece):
                await pipe.feed(data[i : i + piece])
            return await pipe.finish()

        res = asyncio.run(run(UploadPipeline(staged, pool=BlockPool(block), max_size=1 << 30)))
        assert res.tree == tree_of(data)
        store.abort(staged)


def test_failed_commit_leaves_no_leaf_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FilesystemStore(tmp_path / "images", tmp_path / "staging", direct_io=False)
    iid = str(uuid.uuid4())
    staged = store.begin_write(iid)
    staged.write(b"x" * 100)
    real_fsync = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the leaf list's fsync passes, the image's fails
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(Exception, match="cannot store image"):
        store.commit(staged, tree_leaves=tree_of(b"x" * 100).leaves)
    assert list(store.images_dir.iterdir()) == []
    assert list(store.staging_dir.iterdir()) == []


# -- the client's get_tree (httpx.MockTransport) ---------------------------------------

IID = "11111111-2222-4333-8444-555555555555"


def record(data: bytes, **over: Any) -> Image:
    tree = tree_of(data)
    base: dict[str, Any] = {
        "id": IID,
        "status": "active",
        "size": len(data),
        ROOT_PROPERTY: tree.root,
        LEAF_SIZE_PROPERTY: str(tree.leaf_size),
    }
    base.update(over)
    return Image.from_json({k: v for k, v in base.items() if v is not None})


def serving(leaves: bytes, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v2/images/{IID}/tree"
        assert request.headers["x-auth-token"] == "tok"
        return httpx.Response(status, content=leaves)

    return handler


def client_of(handler: Callable[[httpx.Request], httpx.Response]) -> ImageClient:
    return ImageClient("http://svc", "tok", transport=httpx.MockTransport(handler), retries=0)


def test_get_tree_returns_a_checked_tree() -> None:
    tree = tree_of(DATA)
    got = client_of(serving(tree.leaves)).get_tree(record(DATA))
    assert got == tree
    v = TreeVerifier.from_tree(got)  # ready to verify
    v.update(DATA)
    v.finish()


def test_get_tree_is_none_without_the_property() -> None:
    def never(_r: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    img = record(DATA, **{ROOT_PROPERTY: None, LEAF_SIZE_PROPERTY: None})
    assert client_of(never).get_tree(img) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-32],  # a leaf missing
        lambda b: b + hashlib.sha256(b"x").digest(),  # a leaf too many
        lambda b: bytes([b[0] ^ 1]) + b[1:],  # a flipped bit
        lambda b: b[32:64] + b[:32] + b[64:],  # two leaves swapped
        lambda b: b + b"x" * 10_000,  # more than could belong
    ],
)
def test_get_tree_refuses_leaves_that_do_not_hash_to_the_root(
    mangle: Callable[[bytes], bytes],
) -> None:
    with pytest.raises(IntegrityError, match=IID):
        client_of(serving(mangle(tree_of(DATA).leaves))).get_tree(record(DATA))


def test_get_tree_refuses_bad_properties_and_inactive_images() -> None:
    leaves = tree_of(DATA).leaves
    with pytest.raises(RemoteError, match=LEAF_SIZE_PROPERTY):
        client_of(serving(leaves)).get_tree(record(DATA, **{LEAF_SIZE_PROPERTY: "4096"}))
    with pytest.raises(RemoteError, match=LEAF_SIZE_PROPERTY):
        client_of(serving(leaves)).get_tree(record(DATA, **{LEAF_SIZE_PROPERTY: "-4"}))
    with pytest.raises(IntegrityError, match="root"):
        client_of(serving(leaves)).get_tree(record(DATA, **{ROOT_PROPERTY: "zz"}))
    with pytest.raises(ConflictError, match="saving"):
        client_of(serving(leaves)).get_tree(record(DATA, status="saving"))


def test_catalog_adds_missing_columns_to_an_old_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    Catalog.open(url).close()
    with sqlite3.connect(tmp_path / "old.sqlite") as conn:
        conn.execute("ALTER TABLE images DROP COLUMN tree_leaf_size")
    cat = Catalog.open(url)
    try:
        rec = cat.create(str(uuid.uuid4()), fields={"name": "n"})
        assert rec.tree_leaf_size is None and rec.tree_sha256 is None
    finally:
        cat.close()
