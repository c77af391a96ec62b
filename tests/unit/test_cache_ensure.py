"""ImageCache with a fake client: hits, resume, retries, refusals, list and verify."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from cowfleet.cache import metadata as md
from cowfleet.cache.cache import ImageCache
from cowfleet.cache.layout import Layout
from cowfleet.config import Config
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    IntegrityError,
    UnsafeImageError,
)
from tests.unit._cache_fakes import Behaviour, FakeClient, image_for

MiB = 1024 * 1024


def _cfg(tmp_path: Path, **kw: object) -> Config:
    base = {"fetch_retries": 3, "fetch_deadline": 30.0}
    base.update(kw)
    return Config(home=tmp_path, instances_path=tmp_path / "inst", **base)  # type: ignore[arg-type]


def _setup(tmp_path: Path, data: bytes, behaviour: Behaviour | None = None, **kw: object):
    client = FakeClient()
    iid = str(uuid.uuid4())
    client.add(image_for(iid, data, **kw), data, behaviour)
    sleeps: list[float] = []
    cache = ImageCache(_cfg(tmp_path), client, sleep=sleeps.append, rand=lambda: 0.0)  # type: ignore[arg-type]
    return cache, client, iid, sleeps


def _data(n: int = 5 * MiB) -> bytes:
    return os.urandom(n // 2) + bytes(n - n // 2)


def _base_files(cache: ImageCache) -> list[str]:
    return sorted(n for n in os.listdir(cache.layout.base_dir) if not n.startswith("."))


def test_fetch_then_hit_without_the_client(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, _ = _setup(tmp_path, data)
    first = cache.ensure_cached(iid)
    assert first.fetched and first.format == "raw" and first.virtual_size == len(data)
    assert first.path.read_bytes() == data
    assert _base_files(cache) == [first.path.name]
    calls = (len(client.gets), len(client.downloads))
    again = cache.ensure_cached(iid.upper())
    assert not again.fetched and again.path == first.path and again.image is None
    assert (len(client.gets), len(client.downloads)) == calls
    assert cache.downloads == 1


def test_dropped_connections_resume_with_range(tmp_path: Path) -> None:
    data = _data(9 * MiB)
    cache, client, iid, sleeps = _setup(
        tmp_path, data, Behaviour(fail_after=[3 * MiB + 7, 2 * MiB])
    )
    base = cache.ensure_cached(iid)
    assert base.path.read_bytes() == data
    offsets = [o for _, o in client.downloads]
    assert offsets[0] == 0 and 0 < offsets[1] <= 3 * MiB + 7 and offsets[2] > offsets[1]
    assert sleeps == [0.5, 0.5]  # progress resets the backoff


def test_server_without_range_support_restarts(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, _ = _setup(tmp_path, data, Behaviour(fail_after=[MiB], ignore_range=True))
    assert cache.ensure_cached(iid).path.read_bytes() == data
    assert len(client.downloads) == 2


def test_retries_exhausted_keep_the_part_for_a_later_resume(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, sleeps = _setup(tmp_path, data, Behaviour(fail_after=[MiB, 0, 0, 0]))
    with pytest.raises(BackendUnavailableError):
        cache.ensure_cached(iid)
    assert sleeps == [0.5, 1.0, 2.0]
    paths = cache.layout.paths(iid)
    assert not paths.base.exists() and paths.part.exists() and paths.part_meta.exists()
    # the next call resumes where the last one stopped
    client.behaviour[iid] = Behaviour()
    base = cache.ensure_cached(iid)
    assert base.path.read_bytes() == data
    assert client.downloads[-1][1] > 0
    assert not paths.part.exists() and not paths.part_meta.exists()


def test_killed_process_leftover_is_resumed(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, _ = _setup(tmp_path, data)
    image = client.images[iid][0]
    lay = cache.layout
    lay.ensure_dirs()
    paths = lay.paths(iid)
    md.write_atomic(
        paths.part_meta,
        md.PartMeta(iid, len(data), "sha512", image.os_hash_value or "", "x", 0.0).to_json(),
    )
    paths.part.write_bytes(data[: 2 * MiB])
    assert cache.ensure_cached(iid).path.read_bytes() == data
    assert client.downloads == [(iid, 2 * MiB)]


def test_part_of_another_image_is_not_resumed(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, _ = _setup(tmp_path, data)
    paths = cache.layout.paths(iid)
    cache.layout.ensure_dirs()
    md.write_atomic(
        paths.part_meta, md.PartMeta(iid, len(data), "sha512", "ff" * 64, "x", 0.0).to_json()
    )
    paths.part.write_bytes(b"\xff" * MiB)
    assert cache.ensure_cached(iid).path.read_bytes() == data
    assert client.downloads == [(iid, 0)]


def test_wrong_hash_leaves_nothing(tmp_path: Path) -> None:
    data = _data()
    cache, _client, iid, _ = _setup(tmp_path, data, os_hash_value="00" * 64)
    with pytest.raises(IntegrityError, match="mismatch"):
        cache.ensure_cached(iid)
    assert _base_files(cache) == []
    # no base metadata, no resume record: only the note of the failure for waiters
    assert os.listdir(cache.layout.meta_dir) == [cache.layout.paths(iid).failed.name]


def test_more_bytes_than_declared(tmp_path: Path) -> None:
    data = _data()
    cache, _client, iid, _ = _setup(tmp_path, data, Behaviour(extra=b"xx", lie_total=True))
    with pytest.raises(IntegrityError, match="more than the declared"):
        cache.ensure_cached(iid)
    assert _base_files(cache) == []
    cache2, _c, iid2, _ = _setup(tmp_path / "2", data, Behaviour(extra=b"xx"))
    with pytest.raises(IntegrityError, match="more bytes than declared"):
        cache2.ensure_cached(iid2)


def test_truncated_body_after_retries(tmp_path: Path) -> None:
    data = _data()
    cache, _client, iid, _ = _setup(tmp_path, data, Behaviour(truncate_to=MiB, lie_total=True))
    with pytest.raises(IntegrityError, match="truncated"):
        cache.ensure_cached(iid)
    assert _base_files(cache) == []


def _qcow2_with_backing(tmp_path: Path) -> bytes:
    from cowfleet.formats.overlay import create_overlay

    create_overlay(
        tmp_path / "evil.qcow2", Path("/etc/shadow"), "raw", size=MiB, backing_virtual_size=MiB
    )
    return (tmp_path / "evil.qcow2").read_bytes()


@pytest.mark.parametrize("declared", ["raw", "qcow2"])
def test_unsafe_or_mismatched_format_is_refused(tmp_path: Path, declared: str) -> None:
    data = _qcow2_with_backing(tmp_path)
    cache, _client, iid, _ = _setup(tmp_path, data, disk_format=declared)
    with pytest.raises(UnsafeImageError):
        cache.ensure_cached(iid)
    assert _base_files(cache) == []


def test_inactive_image_is_refused(tmp_path: Path) -> None:
    cache, _client, iid, _ = _setup(tmp_path, _data(), status="queued")
    with pytest.raises(ConflictError):
        cache.ensure_cached(iid)


def test_symlinks_planted_at_part_and_base_are_not_followed(tmp_path: Path) -> None:
    data = _data()
    cache, _client, iid, _ = _setup(tmp_path, data)
    cache.layout.ensure_dirs()
    paths = cache.layout.paths(iid)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, paths.part)
    os.symlink(victim, paths.base)
    base = cache.ensure_cached(iid)
    assert not base.path.is_symlink() and base.path.read_bytes() == data
    assert victim.read_text() == "keep"


def test_threads_share_one_download(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, _ = _setup(tmp_path, data)
    results = []

    def go() -> None:
        results.append(cache.ensure_cached(iid))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and sum(r.fetched for r in results) == 1
    assert len(client.downloads) == 1


def test_waiters_share_a_failure_instead_of_repeating_it(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, _ = _setup(tmp_path, data, Behaviour(delay=0.05), os_hash_value="00" * 64)
    errors: list[BaseException] = []

    def go() -> None:
        try:
            cache.ensure_cached(iid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 5 and all(isinstance(e, IntegrityError) for e in errors)
    assert len(client.downloads) == 1  # one failed download, not five
    # a later call (not waiting during the failure) tries again
    with pytest.raises(IntegrityError, match="mismatch"):
        cache.ensure_cached(iid)
    assert len(client.downloads) == 2


def test_kernel_and_ramdisk_follow(tmp_path: Path) -> None:
    client = FakeClient()
    kid, rid, iid = (str(uuid.uuid4()) for _ in range(3))
    k, r, root = os.urandom(1000), os.urandom(2000), _data()
    client.add(image_for(kid, k, disk_format="aki"), k)
    client.add(image_for(rid, r, disk_format="ari"), r)
    client.add(
        image_for(iid, root, disk_format="ami", properties={"kernel_id": kid, "ramdisk_id": rid}),
        root,
    )
    cache = ImageCache(_cfg(tmp_path), client)  # type: ignore[arg-type]
    got = cache.ensure_cached_with_deps(iid)
    assert got.kernel is not None and got.kernel.path.read_bytes() == k
    assert got.ramdisk is not None and got.ramdisk.path.read_bytes() == r
    again = cache.ensure_cached_with_deps(iid)  # from metadata, no client
    assert again.kernel is not None and not again.kernel.fetched
    assert len(client.downloads) == 3


def test_list_and_verify_detect_tampering(tmp_path: Path) -> None:
    data = _data()
    cache, client, iid, _ = _setup(tmp_path, data)
    base = cache.ensure_cached(iid)
    (cache.layout.base_dir / "junk").write_text("?")
    entries = {e.name: e for e in cache.list()}
    assert entries[base.path.name].state == "verified"
    assert entries[base.path.name].image_id == iid
    assert entries["junk"].kind == "unknown"
    assert [r.ok for r in cache.verify()] == [True]
    with open(base.path, "r+b") as fh:  # flip one byte in place
        fh.write(b"\xaa")
    results = cache.verify(iid)
    assert not results[0].ok and "mismatch" in (results[0].failure or "")
    with pytest.raises(IntegrityError, match="failed verification"):
        cache.ensure_cached(iid)
    assert {e.name: e for e in cache.list()}[base.path.name].state == "failed"
    assert len(client.downloads) == 1


def test_list_reports_users_from_qcow2_headers(tmp_path: Path) -> None:
    from cowfleet.formats.overlay import create_overlay

    data = _data()
    cache, _client, iid, _ = _setup(tmp_path, data)
    base = cache.ensure_cached(iid)
    inst = str(uuid.uuid4())
    disk_dir = Path(cache.cfg.instances_path) / inst
    disk_dir.mkdir()
    create_overlay(disk_dir / "disk", base.path, "raw", backing_virtual_size=len(data))
    (disk_dir / "disk.info").write_text("{}")
    entry = {e.name: e for e in cache.list()}[base.path.name]
    assert entry.users == (inst,)
    assert Layout(cache.cfg.instances_path).paths(iid).base == base.path


def test_the_hash_tree_is_preferred_to_the_digest(tmp_path: Path) -> None:
    from cowfleet.hashtree import tree_of

    data = os.urandom(9 * MiB + 5)
    # A digest that does not match: the fetch succeeds only if the tree is what verifies.
    cache, client, iid, _ = _setup(tmp_path, data, os_hash_value="ab" * 64)
    client.trees[iid] = tree_of(data)
    assert cache.ensure_cached(iid).path.read_bytes() == data


def test_a_leaf_that_is_not_the_trees_is_refused(tmp_path: Path) -> None:
    from cowfleet.hashtree import tree_of

    data = os.urandom(9 * MiB)
    cache, client, iid, _ = _setup(tmp_path, data)  # the digest matches the data...
    client.trees[iid] = tree_of(data[: 4 * MiB] + bytes(MiB) + data[5 * MiB :])  # ...the tree not
    with pytest.raises(IntegrityError, match="leaf 1"):
        cache.ensure_cached(iid)
    assert not cache.layout.paths(iid).base.exists()
