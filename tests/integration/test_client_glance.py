"""cowfleet's image client against real OpenStack Glance 33 (no keystone, no token)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from cowfleet.errors import ConflictError, NotFoundError
from cowfleet.images.client import ImageClient
from tests.fixtures.glance import GlanceServer

pytestmark = pytest.mark.integration


@pytest.fixture
def client(glance: GlanceServer) -> ImageClient:
    c = ImageClient(glance.url)  # no token: Glance without keystone
    yield c  # type: ignore[misc]
    c.close()


def _unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


def test_create_upload_show_list_download(client: ImageClient, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    name = _unique("interop")
    image = client.create(
        name=name,
        disk_format="raw",
        container_format="bare",
        min_disk=1,
        properties={"os_type": "linux", "kernel_id": "k-1"},
    )
    assert image.status == "queued"
    assert image.properties["kernel_id"] == "k-1"

    active = client.upload(image.id, io.BytesIO(data), size=len(data))
    assert active.status == "active"
    assert active.size == len(data)
    assert active.checksum == hashlib.md5(data).hexdigest()
    assert active.os_hash_algo == "sha512"
    assert active.os_hash_value == hashlib.sha512(data).hexdigest()
    assert active.min_disk == 1

    shown = client.get(image.id)
    assert shown == active
    assert client.find(name).id == image.id
    assert image.id in {i.id for i in client.list(name=name)}

    dest = tmp_path / "copy.raw"
    got = client.download(image.id, dest)
    assert got.id == image.id
    assert dest.read_bytes() == data
    assert not (tmp_path / "copy.raw.part").exists()

    with client.open_download(image.id, offset=len(data) - 10) as stream:
        assert stream.status == 206
        assert stream.offset == len(data) - 10
        assert stream.total_size == len(data)
        assert stream.content_md5 == hashlib.md5(data).hexdigest()
        assert b"".join(stream.iter_chunks()) == data[-10:]


def test_chunked_upload_and_patch(client: ImageClient) -> None:
    data = [os.urandom(1 << 20) for _ in range(5)]
    image = client.create(name=_unique("chunked"), disk_format="raw", container_format="bare")
    active = client.upload(image.id, iter(data))  # no size: chunked transfer encoding
    assert active.size == 5 << 20
    assert active.os_hash_value == hashlib.sha512(b"".join(data)).hexdigest()

    updated = client.update(image.id, {"ramdisk_id": "r-1", "name": "renamed-" + image.id})
    assert updated.properties["ramdisk_id"] == "r-1"
    assert updated.name == "renamed-" + image.id
    removed = client.update(image.id, {"ramdisk_id": None})
    assert "ramdisk_id" not in removed.properties


def test_pagination_follows_next(client: ImageClient) -> None:
    name = _unique("paged")
    ids = {
        client.create(name=name, disk_format="raw", container_format="bare").id for _ in range(3)
    }
    listed = [i.id for i in client.list(name=name, limit=1)]
    assert sorted(listed) == sorted(ids)
    with pytest.raises(ConflictError):
        client.find(name)


def test_errors_map_to_the_tree(client: ImageClient) -> None:
    with pytest.raises(NotFoundError):
        client.get("00000000-0000-4000-8000-000000000000")
    image = client.create(name=_unique("gone"), disk_format="raw", container_format="bare")
    client.delete(image.id)
    with pytest.raises(NotFoundError):
        client.find(image.id)
