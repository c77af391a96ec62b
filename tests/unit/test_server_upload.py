"""The upload pipeline: hashes, inspection and staging, independent of HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import pytest

from cowfleet.errors import IntegrityError
from cowfleet.images.server.store import FilesystemStore
from cowfleet.images.server.upload import UploadPipeline
from tests.unit.hostile_corpus import MIB, qcow2


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "images", tmp_path / "staging")


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(("block", "piece"), [(4096, 1000), (64 * 1024, 65536), (MIB, 7)])
def test_hashes_and_inspection_do_not_depend_on_chunking(
    store: FilesystemStore, block: int, piece: int
) -> None:
    data = qcow2(size=32 * MIB) + b"tail" * 1000 if piece > 100 else qcow2(size=32 * MIB)
    iid = str(uuid.uuid4())
    staged = store.begin_write(iid)

    async def run() -> None:
        pipe = UploadPipeline(staged, block_size=block, max_size=1 << 30)
        for p in pieces(data, piece):
            await pipe.feed(p)
        res = await pipe.finish()
        assert res.size == len(data)
        assert res.checksum == hashlib.md5(data).hexdigest()
        assert res.os_hash_value == hashlib.sha512(data).hexdigest()
        assert res.inspection.format == "qcow2"
        assert res.inspection.virtual_size == 32 * MIB

    asyncio.run(run())
    store.commit(staged)
    assert store.path(iid).read_bytes() == data
    assert list(store.staging_dir.iterdir()) == []


def test_size_cap_stops_the_upload_and_abort_leaves_nothing(
    store: FilesystemStore,
) -> None:
    staged = store.begin_write(str(uuid.uuid4()))

    async def run() -> None:
        pipe = UploadPipeline(staged, block_size=4096, max_size=10_000)
        with pytest.raises(IntegrityError) as err:
            for _ in range(10):
                await pipe.feed(b"x" * 3000)
        assert err.value.context["http_status"] == 413
        pipe.abort()

    asyncio.run(run())
    store.abort(staged)
    assert list(store.staging_dir.iterdir()) == []
    assert list(store.images_dir.iterdir()) == []


def test_store_names_files_by_canonical_uuid_only(store: FilesystemStore) -> None:
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")
    with pytest.raises(ValueError):
        store.path(str(uuid.uuid4()).upper())
    iid = str(uuid.uuid4())
    assert store.path(iid).parent == store.images_dir


def test_open_descriptor_survives_delete(store: FilesystemStore) -> None:
    import os

    iid = str(uuid.uuid4())
    staged = store.begin_write(iid)
    staged.write(b"abc" * 1000)
    store.commit(staged)
    fd = store.open_read(iid)
    try:
        store.delete(iid)
        assert not store.path(iid).exists()
        assert os.pread(fd, 6, 0) == b"abcabc"
    finally:
        os.close(fd)


@pytest.mark.parametrize("drop_behind", [False, True])
def test_writeback_and_drop_behind_keep_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop_behind: bool
) -> None:
    import os

    from cowfleet.images.server import store as store_mod

    step = 64 * 1024
    monkeypatch.setattr(store_mod, "WRITEBACK_STEP", step)
    fs = FilesystemStore(tmp_path / "images", tmp_path / "staging", drop_behind=drop_behind)
    iid = str(uuid.uuid4())
    staged = fs.begin_write(iid)
    data = os.urandom(10 * step + 123)
    for piece in pieces(data, 7000):
        staged.write_parts([piece[:100], piece[100:]])
    assert staged.synced_to >= 9 * step  # writeback was started along the way
    if drop_behind:
        # Windows that started writeback a whole step ago were dropped, never ahead.
        assert 0 < staged.dropped_to <= staged.synced_to - step
    else:
        assert staged.dropped_to == 0
    fs.commit(staged)
    assert staged.dropped_to == (len(data) if drop_behind else 0)
    assert fs.path(iid).read_bytes() == data


def test_drop_upload_cache_setting_reaches_the_store(tmp_path: Path) -> None:
    from cowfleet import config
    from cowfleet.images.server import ServerSettings, create_app

    env = {"COWFLEET_HOME": str(tmp_path), "COWFLEET_IMAGES_DROP_UPLOAD_CACHE": "true"}
    for given, expected in ((env, True), ({"COWFLEET_HOME": str(tmp_path)}, False)):
        settings = ServerSettings.from_config(config.load(env=given), token=None)
        assert settings.upload_drop_behind is expected
        app = create_app(settings)
        store = app.state.service.store
        assert store.drop_behind is expected
        assert store.begin_write(str(uuid.uuid4())).drop_behind is expected
        app.state.service.catalog.close()
