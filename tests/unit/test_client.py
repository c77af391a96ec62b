"""ImageClient against httpx.MockTransport: error mapping, paging, find, patch, resume."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    IntegrityError,
    NotFoundError,
    RemoteError,
    UnsafeImageError,
    UsageError,
    ValidationError,
)
from cowfleet.images.client import ImageClient

IID = "11111111-2222-4333-8444-555555555555"
DATA = os.urandom(3 * 1024 * 1024 + 5)


def record(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": IID,
        "name": "img",
        "status": "active",
        "disk_format": "raw",
        "container_format": "bare",
        "size": len(DATA),
        "virtual_size": len(DATA),
        "checksum": hashlib.md5(DATA).hexdigest(),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(DATA).hexdigest(),
        "min_disk": 0,
        "min_ram": 0,
        "visibility": "shared",
        "protected": False,
        "owner": None,
        "created_at": "t",
        "updated_at": "t",
        "self": f"/v2/images/{IID}",
        "file": f"/v2/images/{IID}/file",
        "schema": "/v2/schemas/image",
        "tags": [],
        "os_hidden": False,
        "kernel_id": "k",
    }
    base.update(over)
    return base


def make(handler: Callable[[httpx.Request], httpx.Response]) -> ImageClient:
    return ImageClient(
        "http://svc",
        "tok",
        transport=httpx.MockTransport(handler),
        retries=3,
        sleep=lambda _s: None,
    )


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (401, UsageError),
        (403, UsageError),
        (404, NotFoundError),
        (409, ConflictError),
        (400, ValidationError),
        (413, ValidationError),
        (415, UnsafeImageError),
        (500, RemoteError),
        (503, RemoteError),
    ],
)
def test_status_mapping(status: int, exc: type[Exception]) -> None:
    client = make(lambda r: httpx.Response(status, json={"message": "why <br />"}))
    with pytest.raises(exc) as info:
        client.get(IID)
    assert "why" in str(info.value) and "<br" not in str(info.value)


def test_connection_refused_is_backend_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(BackendUnavailableError):
        make(refuse).get(IID)


def test_token_header_and_record_parsing() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=record())

    image = make(handler).get(IID)
    assert seen[0].headers["X-Auth-Token"] == "tok"
    assert image.properties == {"kernel_id": "k"}
    assert image.size == len(DATA) and image.visibility == "shared"


def test_list_follows_next_and_keeps_its_query() -> None:
    urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        marker = request.url.params.get("marker")
        if marker is None:
            return httpx.Response(
                200, json={"images": [record(id="a")], "next": "/v2/images?name=x&marker=a"}
            )
        if marker == "a":
            return httpx.Response(
                200, json={"images": [record(id="b")], "next": "/v2/images?name=x&marker=b"}
            )
        return httpx.Response(200, json={"images": []})

    ids = [i.id for i in make(handler).list(name="x")]
    assert ids == ["a", "b"]
    assert urls[1] == "http://svc/v2/images?name=x&marker=a"


def test_find_by_name_unique_missing_and_ambiguous() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.params.get("name")
        hits = {"one": [record(id="a")], "two": [record(id="a"), record(id="b")]}.get(name, [])
        return httpx.Response(200, json={"images": hits})

    client = make(handler)
    assert client.find("one").id == "a"
    with pytest.raises(ConflictError):
        client.find("two")
    with pytest.raises(NotFoundError):
        client.find("none")


def test_update_sends_json_patch() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            assert request.headers["Content-Type"] == (
                "application/openstack-images-v2.1-json-patch"
            )
            bodies.append(json.loads(request.content))
        return httpx.Response(200, json=record())

    make(handler).update(
        IID,
        {"kernel_id": "k2", "os_type": "linux", "min_disk": "3", "name": "n", "ramdisk_id": None},
    )
    assert bodies == [
        [
            {"op": "replace", "path": "/kernel_id", "value": "k2"},
            {"op": "add", "path": "/os_type", "value": "linux"},
            {"op": "replace", "path": "/min_disk", "value": 3},
            {"op": "replace", "path": "/name", "value": "n"},
            {"op": "remove", "path": "/ramdisk_id"},
        ]
    ]


class FlakyFile:
    """Serves DATA; the first body breaks after ``cut`` bytes; honours Range unless told."""

    def __init__(self, cut: int, *, ranges: bool = True, data: bytes = DATA) -> None:
        self.cut, self.ranges, self.data = cut, ranges, data
        self.ranges_seen: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/file"):
            return httpx.Response(200, json=record())
        rng = request.headers.get("Range")
        self.ranges_seen.append(rng)
        start = int(rng[6:-1]) if rng and self.ranges else 0
        body = self.data[start:]
        broken = len(self.ranges_seen) == 1

        def stream() -> Iterator[bytes]:
            sent = 0
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                if broken and sent + len(piece) > self.cut:
                    raise httpx.ReadError("connection dropped")
                sent += len(piece)
                yield piece

        headers = {"Content-Length": str(len(body))}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        return httpx.Response(206 if start else 200, headers=headers, content=stream())


def test_download_resumes_with_range(tmp_path: Path) -> None:
    server = FlakyFile(cut=1 << 20)
    dest = tmp_path / "img"
    make(server).download(IID, dest)
    assert dest.read_bytes() == DATA
    assert server.ranges_seen[0] is None
    assert server.ranges_seen[1] == f"bytes={1 << 20}-"
    assert not (tmp_path / "img.part").exists()


def test_download_restarts_when_range_is_ignored(tmp_path: Path) -> None:
    server = FlakyFile(cut=1 << 20, ranges=False)
    dest = tmp_path / "img"
    make(server).download(IID, dest)
    assert dest.read_bytes() == DATA
    assert len(server.ranges_seen) == 2


def test_download_hash_mismatch_leaves_no_file(tmp_path: Path) -> None:
    bad = bytearray(DATA)
    bad[12345] ^= 0xFF
    server = FlakyFile(cut=len(DATA) + 1, data=bytes(bad))
    dest = tmp_path / "img"
    with pytest.raises(IntegrityError, match="sha512 mismatch"):
        make(server).download(IID, dest)
    assert list(tmp_path.iterdir()) == []


def test_download_gives_up_after_retries(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/file"):
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json=record())

    with pytest.raises(RemoteError):
        make(handler).download(IID, tmp_path / "img")
    assert not (tmp_path / "img").exists()


def test_download_resumes_an_old_part_file(tmp_path: Path) -> None:
    server = FlakyFile(cut=len(DATA) + 1)
    (tmp_path / "img.part").write_bytes(DATA[:1000])
    make(server).download(IID, tmp_path / "img")
    assert (tmp_path / "img").read_bytes() == DATA
    assert server.ranges_seen == ["bytes=1000-"]


def test_upload_sends_length_and_reports_progress(tmp_path: Path) -> None:
    got: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            got["len"] = request.headers.get("Content-Length")
            got["body"] = request.read()
            return httpx.Response(204)
        return httpx.Response(200, json=record())

    src = tmp_path / "f"
    src.write_bytes(DATA)
    seen: list[int] = []
    with src.open("rb") as fh:
        make(handler).upload(IID, fh, progress=lambda done, _t: seen.append(done))
    assert got["len"] == str(len(DATA)) and got["body"] == DATA
    assert seen[-1] == len(DATA)
