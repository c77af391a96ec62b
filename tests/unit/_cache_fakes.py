"""Test doubles for the node cache unit tests (a fake image client and records)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cowfleet.errors import BackendUnavailableError, NotFoundError


@dataclass(frozen=True)
class FakeImage:
    id: str
    name: str | None
    status: str
    disk_format: str | None
    size: int | None
    os_hash_algo: str | None
    os_hash_value: str | None
    checksum: str | None
    container_format: str | None = "bare"
    virtual_size: int | None = None
    properties: dict[str, str] = field(default_factory=dict)


def image_for(image_id: str, data: bytes, *, disk_format: str = "raw", **kw: Any) -> FakeImage:
    fields: dict[str, Any] = {
        "id": image_id,
        "name": kw.pop("name", "img-" + image_id[:8]),
        "status": "active",
        "disk_format": disk_format,
        "size": len(data),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(data).hexdigest(),
        "checksum": hashlib.md5(data).hexdigest(),
    }
    fields.update(kw)
    return FakeImage(**fields)


@dataclass
class FakeStream:
    status: int
    offset: int
    total_size: int | None
    body: bytes
    fail_after: int | None = None  # raise after this many body bytes
    content_md5: str | None = None
    delay: float = 0.0  # seconds per chunk

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        sent = 0
        for i in range(0, len(self.body), chunk_size):
            piece = self.body[i : i + chunk_size]
            if self.fail_after is not None and sent + len(piece) > self.fail_after:
                keep = self.fail_after - sent
                if keep > 0:
                    yield piece[:keep]
                raise BackendUnavailableError("connection dropped (fake)")
            sent += len(piece)
            if self.delay:
                time.sleep(self.delay)
            yield piece


@dataclass
class Behaviour:
    fail_after: list[int | None] = field(default_factory=list)  # per attempt
    ignore_range: bool = False
    extra: bytes = b""  # appended to the body (more bytes than declared)
    lie_total: bool = False  # total_size = len(data) even with extra
    truncate_to: int | None = None  # body stops here, every attempt
    delay: float = 0.0  # seconds per chunk


class FakeClient:
    """Serves images from memory and records every request."""

    def __init__(self) -> None:
        self.images: dict[str, tuple[FakeImage, bytes]] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self.gets: list[str] = []
        self.downloads: list[tuple[str, int]] = []  # (image id, offset asked)
        self.trees: dict[str, Any] = {}  # image id -> hash tree (cowfleet.hashtree.Tree)
        self.lock = threading.Lock()

    def add(self, image: FakeImage, data: bytes, behaviour: Behaviour | None = None) -> None:
        self.images[image.id] = (image, data)
        self.behaviour[image.id] = behaviour or Behaviour()

    def get(self, image_id: str) -> FakeImage:
        with self.lock:
            self.gets.append(image_id)
        if image_id not in self.images:
            raise NotFoundError(f"no image {image_id}")
        return self.images[image_id][0]

    def get_tree(self, image: FakeImage) -> Any:
        return self.trees.get(image.id)

    @contextlib.contextmanager
    def open_download(
        self, image_id: str, *, offset: int = 0, buffers: object = None
    ) -> Iterator[FakeStream]:
        _image, data = self.images[image_id]
        b = self.behaviour[image_id]
        with self.lock:
            attempt = sum(1 for i, _ in self.downloads if i == image_id)
            self.downloads.append((image_id, offset))
        fail_after = b.fail_after[attempt] if attempt < len(b.fail_after) else None
        full = data + b.extra
        if b.truncate_to is not None:
            full = full[: b.truncate_to]
        total = len(data) if b.lie_total or not b.extra else len(full)
        if offset and not b.ignore_range:
            yield FakeStream(206, offset, total, full[offset:], fail_after, delay=b.delay)
        else:
            yield FakeStream(200, 0, total, full, fail_after, delay=b.delay)
