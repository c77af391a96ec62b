"""The sha256 hash tree end to end: the real image service (``cowfleet images serve``)
computes it at upload, publishes it and serves its leaves; the client checks them and
they verify the bytes downloaded. Real Glance publishes no tree: get_tree is None."""

from __future__ import annotations

import os
import sqlite3

import httpx
import pytest

from cowfleet.errors import IntegrityError, UsageError
from cowfleet.hashtree import (
    DEFAULT_LEAF_SIZE,
    LEAF_SIZE_PROPERTY,
    ROOT_PROPERTY,
    TreeVerifier,
    tree_of,
)
from cowfleet.images.client import ImageClient
from tests.fixtures.glance import GlanceServer
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.integration

DATA = os.urandom(2 * DEFAULT_LEAF_SIZE + 777)


def test_upload_publishes_a_tree_that_verifies_the_download(image_service: ImageService) -> None:
    iid = image_service.upload("tree", DATA)
    with ImageClient(image_service.url, image_service.token) as client:
        image = client.get(iid)
        assert image.properties[ROOT_PROPERTY] == tree_of(DATA).root
        assert image.properties[LEAF_SIZE_PROPERTY] == str(DEFAULT_LEAF_SIZE)
        tree = client.get_tree(image)
        assert tree is not None and tree.count == 3 and tree.length == len(DATA)
        verifier = TreeVerifier.from_tree(tree, image_id=iid)
        got = bytearray()
        with client.open_download(iid) as stream:
            for chunk in stream.iter_chunks(1 << 20):
                verifier.update(chunk)
                got += chunk
        verifier.finish()
        assert bytes(got) == DATA
        # Pieces fetched by range verify one by one (as a peer transfer will).
        with client.open_download(iid, offset=DEFAULT_LEAF_SIZE) as stream:
            rest = b"".join(stream.iter_chunks())
        verifier.check_leaf(1, rest[:DEFAULT_LEAF_SIZE])
        verifier.check_leaf(2, rest[DEFAULT_LEAF_SIZE:])
        with pytest.raises(IntegrityError, match="leaf 2 at byte offset"):
            verifier.check_leaf(2, rest[DEFAULT_LEAF_SIZE:-1] + b"?")


def test_tree_properties_cannot_be_patched(image_service: ImageService) -> None:
    iid = image_service.upload("ro", DATA[:5000])
    with ImageClient(image_service.url, image_service.token) as client:
        before = client.get(iid)
        with pytest.raises(UsageError, match="403") as err:
            client.update(iid, {ROOT_PROPERTY: "0" * 64})
        assert err.value.context["status"] == 403
        with pytest.raises(UsageError, match="403"):
            client.update(iid, {LEAF_SIZE_PROPERTY: None})
        assert client.get(iid).properties == before.properties
    with httpx.Client(base_url=image_service.url, headers=image_service.headers) as http:
        r = http.patch(
            f"/v2/images/{iid}",
            json=[{"op": "add", "path": f"/{LEAF_SIZE_PROPERTY}", "value": "65536"}],
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        )
        assert r.status_code == 403
        # Without the token: 401 like the image itself.
        r = httpx.get(f"{image_service.url}/v2/images/{iid}/tree")
        assert r.status_code == 401


def test_delete_removes_the_leaf_file(image_service: ImageService) -> None:
    iid = image_service.upload("gone", DATA[:70_000])
    leaf_file = image_service.data_dir / "images" / f"{iid}.tree"
    assert leaf_file.read_bytes() == tree_of(DATA[:70_000]).leaves
    with ImageClient(image_service.url, image_service.token) as client:
        client.delete(iid)
    assert not leaf_file.exists()
    assert not (image_service.data_dir / "images" / iid).exists()


def test_client_refuses_a_leaf_list_that_does_not_hash_to_the_root(
    image_service: ImageService,
) -> None:
    iid = image_service.upload("tampered", DATA)
    leaf_file = image_service.data_dir / "images" / f"{iid}.tree"
    leaves = bytearray(leaf_file.read_bytes())
    leaves[40] ^= 0x01  # leaf 1's digest, changed in place on the server
    leaf_file.write_bytes(leaves)
    with ImageClient(image_service.url, image_service.token) as client:
        with pytest.raises(IntegrityError, match=f"image {iid}.*does not match its root"):
            client.get_tree(client.get(iid))
        leaf_file.write_bytes(bytes(leaves[:-32]))  # a leaf short
        with pytest.raises(IntegrityError, match=f"image {iid}"):
            client.get_tree(client.get(iid))


def test_image_from_before_trees_has_none(image_service: ImageService) -> None:
    """An image whose catalog row and store predate trees: no properties, get_tree None,
    /tree 404; a restart migrates the catalog in place and keeps the image."""
    iid = image_service.upload("old", DATA[:9000])
    image_service.stop()
    with sqlite3.connect(image_service.data_dir / "catalog.sqlite") as conn:
        conn.execute("ALTER TABLE images DROP COLUMN tree_sha256")
        conn.execute("ALTER TABLE images DROP COLUMN tree_leaf_size")
    (image_service.data_dir / "images" / f"{iid}.tree").unlink()
    image_service.start()
    with ImageClient(image_service.url, image_service.token) as client:
        image = client.get(iid)
        assert ROOT_PROPERTY not in image.properties
        assert client.get_tree(image) is None
    with httpx.Client(base_url=image_service.url, headers=image_service.headers) as http:
        assert http.get(f"/v2/images/{iid}/tree").status_code == 404
        assert http.get(f"/v2/images/{iid}/file").content == DATA[:9000]


def test_real_glance_publishes_no_tree(glance: GlanceServer) -> None:
    with ImageClient(glance.url) as client:
        image = client.create(
            name=f"tree-{os.urandom(4).hex()}", disk_format="raw", container_format="bare"
        )
        try:
            image = client.upload(image.id, DATA[:4096])
            assert image.os_hash_value  # Glance's sha512 is what a node verifies with
            assert client.get_tree(image) is None
        finally:
            client.delete(image.id)
