"""The fetch engine resumes after a dropped connection, for both of its sinks.

A real loopback HTTP server (``_cache_rogue``) closes the connection half way through
the body; the ``_base`` sink (``ImageCache.ensure_cached``) and the user's-file sink
(``ImageClient.download``) both ask for the missing bytes only (``Range``), through the
project's data transport, and end with the exact image.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowfleet.cache.cache import ImageCache
from cowfleet.config import Config
from cowfleet.errors import BackendUnavailableError
from cowfleet.images.client import ImageClient
from tests.integration._cache_rogue import RogueImage, RogueServer

MiB = 1024 * 1024


@pytest.fixture
def rogue() -> Iterator[RogueServer]:
    with RogueServer() as srv:
        yield srv


def _data(size: int) -> bytes:
    # data, a run of zeros (holes in _base), data
    third = size // 3
    return os.urandom(third) + bytes(third) + os.urandom(size - 2 * third)


def _cfg(tmp_path: Path, url: str) -> Config:
    return Config(
        home=tmp_path / "home",
        instances_path=tmp_path / "inst",
        image_url=url,
        fetch_retries=2,
        fetch_deadline=60.0,
    )


def test_base_sink_resumes_after_a_drop_mid_body(rogue: RogueServer, tmp_path: Path) -> None:
    data = _data(8 * MiB)
    img = rogue.add(RogueImage(str(uuid.uuid4()), data, mode="dropfirst"))
    cfg = _cfg(tmp_path, rogue.url)
    with ImageClient(rogue.url, None, timeout=10) as client:
        base = ImageCache(cfg, client, backoff=0.01).ensure_cached(img.id)
    assert base.fetched
    assert hashlib.sha512(base.path.read_bytes()).hexdigest() == hashlib.sha512(data).hexdigest()
    assert rogue.file_requests(img.id) == [None, f"bytes={4 * MiB}-"]
    assert not list((tmp_path / "inst" / "_base").glob("*.part"))


def test_file_sink_resumes_after_a_drop_mid_body(rogue: RogueServer, tmp_path: Path) -> None:
    data = _data(8 * MiB)
    img = rogue.add(RogueImage(str(uuid.uuid4()), data, mode="dropfirst"))
    dest = tmp_path / "copy.raw"
    with ImageClient(rogue.url, None, timeout=10, backoff=0.01) as client:
        client.download(img.id, dest)
    assert dest.read_bytes() == data
    assert rogue.file_requests(img.id) == [None, f"bytes={4 * MiB}-"]
    assert not (tmp_path / "copy.raw.part").exists()


def test_file_sink_resumes_the_part_of_an_earlier_run(rogue: RogueServer, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)  # no zeros: the kept part ends where the drop was
    img = rogue.add(RogueImage(str(uuid.uuid4()), data, mode="drop"))
    dest = tmp_path / "copy.raw"
    with ImageClient(rogue.url, None, timeout=10, retries=0) as client:
        with pytest.raises(BackendUnavailableError, match="peer closed"):
            client.download(img.id, dest)
        part = tmp_path / "copy.raw.part"
        assert part.stat().st_size == 3 * MiB and not dest.exists()
        img.mode = "ok"
        client.download(img.id, dest)
    assert dest.read_bytes() == data
    assert rogue.file_requests(img.id) == [None, f"bytes={3 * MiB}-"]
    assert not part.exists()


def test_base_sink_refetches_once_when_kept_bytes_do_not_verify(
    rogue: RogueServer, tmp_path: Path
) -> None:
    """A ``.part`` whose record matches but whose bytes are not the image's (a torn
    write, a planted file) is fetched again from byte 0 once, not refused."""
    from cowfleet.cache import metadata as md

    data = os.urandom(4 * MiB)
    img = rogue.add(RogueImage(str(uuid.uuid4()), data))
    cfg = _cfg(tmp_path, rogue.url)
    with ImageClient(rogue.url, None, timeout=10) as client:
        cache = ImageCache(cfg, client, backoff=0.01)
        cache.layout.ensure_dirs()
        paths = cache.layout.paths(img.id)
        record = md.PartMeta(
            img.id, len(data), "sha512", hashlib.sha512(data).hexdigest(), rogue.url, 0.0
        )
        md.write_atomic(paths.part_meta, record.to_json())
        paths.part.write_bytes(os.urandom(MiB))  # not the image's first MiB
        base = cache.ensure_cached(img.id)
    assert base.path.read_bytes() == data
    assert rogue.file_requests(img.id) == [f"bytes={MiB}-", None]


def test_both_sinks_verify_with_the_hash_tree_of_the_real_service(
    image_service: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The image service publishes a tree; ``cache fetch`` and ``image download`` use it
    (and a drop mid-body is still resumed: the tree is fed the kept bytes again)."""
    import io
    import logging

    data = _data(9 * MiB + 7)
    with ImageClient(image_service.url, image_service.token, timeout=30) as client:
        img = client.create(name="tree", disk_format="raw", container_format="bare")
        client.upload(img.id, io.BytesIO(data), size=len(data))
        assert client.get_tree(client.get(img.id)) is not None
        caplog.set_level(logging.INFO, logger="cowfleet.cache.fetcher")
        cfg = _cfg(tmp_path, image_service.url)
        base = ImageCache(cfg, client).ensure_cached(img.id)
        assert base.path.read_bytes() == data
        assert "verified with sha256 tree" in caplog.text
        dest = tmp_path / "copy.raw"
        assert client.download(img.id, dest).id == img.id
        assert dest.read_bytes() == data
