"""The upload pipeline: hashes, inspection and staging, independent of HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from cowfleet.errors import IntegrityError
from cowfleet.images.server.store import FilesystemStore
from cowfleet.images.server.upload import BlockPool, UploadPipeline
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
        pipe = UploadPipeline(staged, pool=BlockPool(block), max_size=1 << 30)
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
        pipe = UploadPipeline(staged, pool=BlockPool(4096), max_size=10_000)
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
    fs = FilesystemStore(
        tmp_path / "images", tmp_path / "staging", direct_io=False, drop_behind=drop_behind
    )
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


def test_page_cache_settings_reach_the_store_and_the_service(tmp_path: Path) -> None:
    from cowfleet import config
    from cowfleet.images.server import ServerSettings, create_app

    home = {"COWFLEET_HOME": str(tmp_path)}
    cases = [
        (home, True, 2, False),
        ({**home, "COWFLEET_IMAGES_DIRECT_IO": "false"}, False, 2, False),
        ({**home, "COWFLEET_IMAGES_CACHE_MIN_USES": "0"}, True, 0, True),
    ]
    for env, direct, min_uses, drop_behind in cases:
        settings = ServerSettings.from_config(config.load(env=env), token=None)
        assert (settings.direct_io, settings.cache_min_uses) == (direct, min_uses)
        app = create_app(settings)
        store = app.state.service.store
        assert (store.direct_io, store.drop_behind) == (direct, drop_behind)
        staged = store.begin_write(str(uuid.uuid4()))
        assert staged.drop_behind is drop_behind
        store.abort(staged)
        app.state.service.catalog.close()


@pytest.mark.parametrize(
    "sizes",
    [
        [1],
        [4095, 1, 4096],
        [3 * MIB + 5, 7, MIB - 12],
        [4 * MIB, 4 * MIB, 123],
        [100_000] * 90,
    ],
)
def test_direct_writes_keep_every_byte_whatever_the_sizes(
    direct_io_dir: Path, sizes: list[int]
) -> None:
    import os

    fs = FilesystemStore(direct_io_dir / "images", direct_io_dir / "staging")
    iid = str(uuid.uuid4())
    staged = fs.begin_write(iid)
    assert staged.direct
    data = os.urandom(sum(sizes))
    pos = 0
    for n in sizes:
        staged.write(data[pos : pos + n])
        pos += n
    assert staged.written == len(data)
    fs.commit(staged)
    assert fs.path(iid).read_bytes() == data  # the padding of the last block is cut off
    assert list(fs.staging_dir.iterdir()) == []


def test_aligned_blocks_go_straight_to_disk_and_odd_ones_through_the_buffer(
    direct_io_dir: Path,
) -> None:
    import mmap
    import os

    from cowfleet.images.server.store import DIRECT_ALIGN

    fs = FilesystemStore(direct_io_dir / "images", direct_io_dir / "staging")
    iid = str(uuid.uuid4())
    staged = fs.begin_write(iid)
    block = mmap.mmap(-1, 16 * DIRECT_ALIGN)
    chunks = []
    for n in (16 * DIRECT_ALIGN, 8 * DIRECT_ALIGN, 16 * DIRECT_ALIGN, 1000):
        data = os.urandom(n)
        block[:n] = data
        staged.write_block(block, n)
        chunks.append(data)
        if n % DIRECT_ALIGN == 0:
            assert staged._pending == 0  # written from the block itself
    assert staged._pending == 1000  # the odd tail waits in the aligned buffer
    fs.commit(staged)
    assert fs.path(iid).read_bytes() == b"".join(chunks)


def test_a_filesystem_without_o_direct_gets_buffered_writes_and_no_leftover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    real_open = os.open

    def refuse_direct(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if flags & os.O_DIRECT:
            fd = real_open(path, flags & ~os.O_DIRECT, mode, **kw)  # created, then refused,
            os.close(fd)  # as the kernel does it
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", refuse_direct)
    fs = FilesystemStore(tmp_path / "images", tmp_path / "staging")
    iid = str(uuid.uuid4())
    staged = fs.begin_write(iid)
    assert not staged.direct and not fs.direct_io
    assert [p.name for p in fs.staging_dir.iterdir()] == [staged.path.name]
    staged.write(b"abc" * 5000)
    fs.commit(staged)
    assert fs.path(iid).read_bytes() == b"abc" * 5000
    assert not fs.begin_write(str(uuid.uuid4())).direct  # remembered: no second try


def test_disk_full_during_a_direct_write_is_storage_full(
    direct_io_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from cowfleet.errors import StorageFullError
    from cowfleet.images.server import store as store_mod

    fs = FilesystemStore(direct_io_dir / "images", direct_io_dir / "staging")
    staged = fs.begin_write(str(uuid.uuid4()))

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "write", full)
    with pytest.raises(StorageFullError):
        staged.write(b"x" * (store_mod.DIRECT_BUFFER + 1))
    with pytest.raises(StorageFullError):
        fs.commit(staged)  # the tail cannot be written either: commit aborts
    assert list(fs.staging_dir.iterdir()) == []
    assert list(fs.images_dir.iterdir()) == []


def test_block_pool_reuses_blocks_and_keeps_only_a_few() -> None:
    pool = BlockPool(8192, keep=2)
    a, b, c = pool.get(), pool.get(), pool.get()
    assert len({id(a), id(b), id(c)}) == 3 and len(a) == 8192
    for blk in (a, b, c):
        pool.put(blk)
    assert pool.idle == 2
    again = {id(pool.get()), id(pool.get())}
    assert again == {id(a), id(b)}
    with pytest.raises(ValueError):
        BlockPool(0)


def test_fill_from_a_reader_equals_feeding_the_same_bytes(store: FilesystemStore) -> None:
    import os
    import random

    data = qcow2(size=64 * MIB) + os.urandom(3 * MIB + 11)
    rng = random.Random(7)
    results = []
    for mode in ("feed", "fill"):
        iid = str(uuid.uuid4())
        staged = store.begin_write(iid)
        pool = BlockPool(64 * 1024)
        pipe = UploadPipeline(staged, pool=pool, max_size=1 << 30, max_in_flight=2)
        pos = 0

        def read_into(buf: memoryview) -> int:
            nonlocal pos
            n = min(len(buf), rng.randint(1, 200_000))
            buf[:n] = data[pos : pos + n]
            pos += n
            return n

        async def run(pipe: UploadPipeline = pipe, mode: str = mode) -> Any:
            if mode == "feed":
                await pipe.feed(data[:1000])
                await pipe.feed(data[1000:])
            else:
                await pipe.feed(data[:1000])
                nonlocal pos
                pos = 1000
                await asyncio.to_thread(pipe.fill, read_into, len(data) - 1000)
            return await pipe.finish()

        res = asyncio.run(run())
        store.commit(staged)
        assert store.path(iid).read_bytes() == data
        assert pool.idle >= 1  # blocks went back to the pool
        results.append((res.size, res.checksum, res.os_hash_value, res.inspection.format))
    assert results[0] == results[1]
    assert results[0][1] == hashlib.md5(data).hexdigest()


def test_fill_refuses_more_than_the_cap_before_reading(store: FilesystemStore) -> None:
    staged = store.begin_write(str(uuid.uuid4()))
    pipe = UploadPipeline(staged, pool=BlockPool(4096), max_size=10_000)

    def never(buf: memoryview) -> int:
        raise AssertionError("read despite the cap")

    with pytest.raises(IntegrityError) as err:
        pipe.fill(never, 10_001)
    assert err.value.context["http_status"] == 413
    pipe.abort()
    store.abort(staged)


def test_a_failing_reader_stops_fill_and_abort_returns_the_blocks(
    store: FilesystemStore,
) -> None:
    staged = store.begin_write(str(uuid.uuid4()))
    pool = BlockPool(4096)
    pipe = UploadPipeline(staged, pool=pool, max_size=1 << 30)
    calls = 0

    def flaky(buf: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise ConnectionResetError("gone")
        n = min(len(buf), 3000)
        buf[:n] = b"z" * n
        return n

    with pytest.raises(ConnectionResetError):
        pipe.fill(flaky, 1 << 20)
    assert 0 < pipe.total <= 15_000
    pipe.abort()
    assert pool.idle >= 1
    store.abort(staged)
