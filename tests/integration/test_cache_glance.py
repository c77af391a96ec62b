"""The node cache against a real Glance (glance-api 33 under a WSGI server on loopback)."""

from __future__ import annotations

import hashlib
import io
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from cowfleet.cache import metadata as md
from cowfleet.cache.cache import ImageCache
from cowfleet.config import Config

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def _upload(client: Any, data: bytes, disk_format: str = "raw", **props: str) -> str:
    img = client.create(
        name=f"cache-{uuid.uuid4().hex[:6]}",
        disk_format=disk_format,
        container_format="bare",
        **props,
    )
    client.upload(img.id, io.BytesIO(data), size=len(data))
    return str(img.id)


def _cache(tmp_path: Path, url: str) -> ImageCache:
    from cowfleet.images.client import ImageClient

    cfg = Config(
        home=tmp_path / "home",
        instances_path=tmp_path / "inst",
        image_url=url,
        fetch_retries=2,
        fetch_deadline=60.0,
    )
    return ImageCache(cfg, ImageClient(url, None, timeout=30.0))


def test_fetch_hit_and_verify_against_glance(glance: Any, tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * MiB) + bytes(3 * MiB)
    cache = _cache(tmp_path, glance.url)
    iid = _upload(cache.client, data)
    image = cache.client.get(iid)
    assert image.os_hash_algo == "sha512"  # Glance computed it; the cache checks it
    base = cache.ensure_cached(iid)
    assert base.fetched and base.path.read_bytes() == data
    assert not cache.ensure_cached(iid).fetched
    assert [r.ok for r in cache.verify()] == [True]


def test_resume_with_range_against_glance(glance: Any, tmp_path: Path) -> None:
    data = random.Random(2).randbytes(4 * MiB)
    cache = _cache(tmp_path, glance.url)
    iid = _upload(cache.client, data)
    cache.layout.ensure_dirs()
    paths = cache.layout.paths(iid)
    md.write_atomic(
        paths.part_meta,
        md.PartMeta(
            iid, len(data), "sha512", hashlib.sha512(data).hexdigest(), "glance", 0.0
        ).to_json(),
    )
    paths.part.write_bytes(data[: MiB + 123])
    base = cache.ensure_cached(iid)
    assert base.path.read_bytes() == data
    assert not paths.part.exists()


def test_kernel_and_ramdisk_from_glance(glance: Any, tmp_path: Path) -> None:
    cache = _cache(tmp_path, glance.url)
    k, r = random.Random(3).randbytes(300_000), random.Random(4).randbytes(500_000)
    kid = _upload(cache.client, k, "aki")
    rid = _upload(cache.client, r, "ari")
    root = random.Random(5).randbytes(MiB)
    iid = _upload(cache.client, root, "ami", kernel_id=kid, ramdisk_id=rid)
    got = cache.ensure_cached_with_deps(iid)
    assert got.kernel is not None and got.kernel.path.read_bytes() == k
    assert got.ramdisk is not None and got.ramdisk.path.read_bytes() == r
