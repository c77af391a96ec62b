"""A resumed fetch verified with the hash tree re-reads only from its checkpoint
(issue 14): the engine with an in-memory source and a real ``.part`` sink.

Guarantees asserted here:

- a run that stops with bytes kept records a checkpoint only for bytes that passed the
  tree (whole leaves) and were written and fsynced; the next run re-reads (and
  re-verifies) only from there, and the inspector gets only the regions it asks for;
- a whole-image digest (sha512, real Glance) never checkpoints: every kept byte is
  re-read, since its state needs the prefix;
- bytes past the checkpoint that do not verify are caught, and the fetch starts over;
- with no checkpoint (a run that was killed) every kept byte is re-read, so a
  corrupted prefix is caught.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from cowfleet import safeopen
from cowfleet.digest import verifier_for
from cowfleet.errors import BackendUnavailableError
from cowfleet.fetch.engine import Checkpoint, Fetched, Want, fetch
from cowfleet.fetch.partsink import PartSink
from cowfleet.fetch.retry import RetryPolicy
from cowfleet.formats.inspector import MAX_CAPTURE, Inspector, inspect_bytes
from cowfleet.formats.probes import TAIL_SIZE
from cowfleet.hashtree import MIN_LEAF_SIZE, tree_of
from tests.unit.test_fetch_engine import ID, Source

LEAF = MIN_LEAF_SIZE  # 64 KiB leaves: many leaves in a small image
SIZE = 40 * LEAF + 1234  # a short last leaf


@dataclass
class Store:
    """An in-memory checkpoint store (the ``_base`` part keeps it in its record)."""

    saved: list[Checkpoint] = field(default_factory=list)
    taken: Checkpoint | None = None

    def load(self) -> Checkpoint | None:
        return self.taken

    def save(self, checkpoint: Checkpoint) -> None:
        self.saved.append(checkpoint)


class CountingSink(PartSink):
    read = 0

    def read_kept(self, offset: int, size: int) -> bytes:
        data = super().read_kept(offset, size)
        self.read += len(data)
        return data


def _sink(tmp_path: Path, store: Store) -> CountingSink:
    with safeopen.opened_dir(tmp_path) as dfd:
        try:
            fd = safeopen.open_existing(dfd, "x.part", display="x.part", flags=os.O_RDWR)
        except FileNotFoundError:
            fd = safeopen.create(dfd, "x.part", display="x.part")
    return CountingSink(fd, "x.part", inspector_factory=Inspector, checkpoints=store)


def _tree_want(data: bytes) -> Want:
    return Want(ID, len(data), verifier_for(ID, None, tree_of(data, LEAF)))


def _sha512_want(data: bytes) -> Want:
    return Want(ID, len(data), verifier_for(ID, ("sha512", hashlib.sha512(data).hexdigest())))


def _run(
    tmp_path: Path, source: Source, want: Want, store: Store, retries: int = 3
) -> tuple[Fetched, CountingSink]:
    sink = _sink(tmp_path, store)
    budget = RetryPolicy(retries=retries).start(sleep=lambda s: None)
    try:
        return fetch(source, sink, want, budget), sink
    finally:
        sink.close()


def _stop_at(tmp_path: Path, data: bytes, want: Want, cut: int) -> Store:
    """A first run whose connection drops at byte ``cut`` with no retry left."""
    store = Store()
    with pytest.raises(BackendUnavailableError):
        _run(tmp_path, Source(data, cut=[cut], piece=50_000), want, store, retries=0)
    assert (tmp_path / "x.part").stat().st_size == cut
    return store


def _image() -> bytes:
    # A qcow2-looking head would do as well; random bytes with a zero run (holes).
    return os.urandom(20 * LEAF) + bytes(10 * LEAF) + os.urandom(SIZE - 30 * LEAF)


def test_a_resumed_tree_fetch_reads_only_from_the_last_checked_leaf(tmp_path: Path) -> None:
    data = _image()
    cut = 33 * LEAF + 5000
    first = _stop_at(tmp_path, data, _tree_want(data), cut)
    # whole leaves that passed the tree and were written: 33 of them
    assert first.saved == [Checkpoint(f"sha256 tree {tree_of(data, LEAF).root}", 33 * LEAF)]

    source = Source(data)
    store = Store(taken=first.saved[-1])
    done, sink = _run(tmp_path, source, _tree_want(data), store)
    assert source.asked == [33 * LEAF]  # the torn last leaf is fetched again
    assert (done.resumed_from, done.skipped, done.restarts) == (33 * LEAF, 33 * LEAF, 0)
    # read again: only what the inspector asks for below the checkpoint
    assert sink.read <= MAX_CAPTURE + TAIL_SIZE
    assert sink.read < cut // 4
    assert (tmp_path / "x.part").read_bytes() == data
    assert done.inspection == inspect_bytes(data)
    assert store.saved == []  # a fetch that completes leaves no checkpoint


def test_kept_leaves_past_the_checkpoint_are_re_read_and_checked(tmp_path: Path) -> None:
    data = _image()
    cut = 33 * LEAF
    first = _stop_at(tmp_path, data, _tree_want(data), cut)
    older = Checkpoint(first.saved[-1].key, 20 * LEAF + 7)  # cut down to leaf 20
    source = Source(data)
    done, sink = _run(tmp_path, source, _tree_want(data), Store(taken=older))
    assert source.asked == [cut] and (done.skipped, done.restarts) == (20 * LEAF, 0)
    assert 13 * LEAF <= sink.read <= 13 * LEAF + MAX_CAPTURE + TAIL_SIZE
    assert (tmp_path / "x.part").read_bytes() == data
    assert done.inspection == inspect_bytes(data)


def test_a_digest_fetch_saves_no_checkpoint_and_rereads_every_kept_byte(
    tmp_path: Path,
) -> None:
    data = _image()
    cut = 33 * LEAF + 5000
    first = _stop_at(tmp_path, data, _sha512_want(data), cut)
    assert first.saved == []
    # even a checkpoint of the tree for the same part is not used by a digest verifier
    tree_key = f"sha256 tree {tree_of(data, LEAF).root}"
    store = Store(taken=Checkpoint(tree_key, 33 * LEAF))
    done, sink = _run(tmp_path, Source(data), _sha512_want(data), store)
    assert sink.read == cut and done.skipped == 0
    assert (tmp_path / "x.part").read_bytes() == data


def test_a_checkpoint_of_another_tree_is_not_used(tmp_path: Path) -> None:
    data = _image()
    cut = 12 * LEAF
    _stop_at(tmp_path, data, _tree_want(data), cut)
    store = Store(taken=Checkpoint("sha256 tree " + "0" * 64, cut))
    done, sink = _run(tmp_path, Source(data), _tree_want(data), store)
    assert sink.read == cut and done.skipped == 0


def test_bad_bytes_past_the_checkpoint_are_caught_and_fetched_again(tmp_path: Path) -> None:
    data = _image()
    cut = 33 * LEAF
    first = _stop_at(tmp_path, data, _tree_want(data), cut)
    with open(tmp_path / "x.part", "r+b") as fh:  # leaf 25: past an earlier checkpoint
        fh.seek(25 * LEAF + 100)
        fh.write(b"\xff" * 64)
    older = Checkpoint(first.saved[-1].key, 20 * LEAF)
    source = Source(data)
    done, _ = _run(tmp_path, source, _tree_want(data), Store(taken=older))
    assert done.restarts == 1 and source.asked == [0] and done.skipped == 0
    assert (tmp_path / "x.part").read_bytes() == data


def test_a_torn_last_leaf_is_fetched_again_not_trusted(tmp_path: Path) -> None:
    data = _image()
    cut = 33 * LEAF + 5000
    first = _stop_at(tmp_path, data, _tree_want(data), cut)
    with open(tmp_path / "x.part", "r+b") as fh:  # the partial leaf 33 is garbage
        fh.seek(33 * LEAF + 100)
        fh.write(b"\xff" * 64)
    source = Source(data)
    done, _ = _run(tmp_path, source, _tree_want(data), Store(taken=first.saved[-1]))
    assert source.asked == [33 * LEAF] and done.restarts == 0
    assert (done.resumed_from, done.skipped) == (33 * LEAF, 33 * LEAF)
    assert (tmp_path / "x.part").read_bytes() == data


def test_without_a_checkpoint_a_corrupted_prefix_is_caught(tmp_path: Path) -> None:
    data = _image()
    cut = 33 * LEAF + 5000
    _stop_at(tmp_path, data, _tree_want(data), cut)
    with open(tmp_path / "x.part", "r+b") as fh:  # e.g. lost writes after a crash
        fh.seek(3 * LEAF)
        fh.write(b"\x00" * 4096)
    source = Source(data)
    done, _ = _run(tmp_path, source, _tree_want(data), Store())  # a killed run: none
    assert done.restarts == 1 and source.asked == [0] and done.skipped == 0
    assert (tmp_path / "x.part").read_bytes() == data


# -- the same through the node cache: the checkpoint lives in the .part's record --------


def test_the_base_cache_resumes_a_tree_fetch_from_its_recorded_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from cowfleet.cache import metadata as md
    from cowfleet.cache.cache import ImageCache
    from cowfleet.config import Config
    from cowfleet.fetch import partsink
    from tests.unit._cache_fakes import Behaviour, FakeClient, image_for

    MiB = 1 << 20
    data = os.urandom(13 * MiB) + bytes(3 * MiB) + os.urandom(MiB + 17)
    iid = str(uuid.uuid4())
    client = FakeClient()
    cut = 9 * MiB + 12345  # every attempt of the first run drops here
    client.add(image_for(iid, data), data, Behaviour(fail_after=[cut, 0, 0]))
    client.trees[iid] = tree_of(data)  # 4 MiB leaves
    cfg = Config(home=tmp_path, instances_path=tmp_path / "inst", fetch_retries=1)
    cache = ImageCache(cfg, client, sleep=lambda s: None, rand=lambda: 0.0)  # type: ignore[arg-type]
    with pytest.raises(BackendUnavailableError):
        cache.ensure_cached(iid)
    paths = cache.layout.paths(iid)
    record = md.read_part_meta(paths.part_meta)
    assert record is not None
    assert (record.checked_by, record.checked) == (f"sha256 tree {tree_of(data).root}", 8 * MiB)

    read: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        got = real_pread(fd, n, offset)
        read.append(len(got))
        return got

    monkeypatch.setattr(partsink.os, "pread", counting_pread)
    base = cache.ensure_cached(iid)
    assert base.fetched and base.path.read_bytes() == data
    # resumed at the last whole leaf (8 MiB): the torn ninth leaf is fetched again, the
    # eight kept leaves are not re-read (only the inspector's few regions)
    assert client.downloads[-1] == (iid, 8 * MiB)
    assert sum(read) <= MAX_CAPTURE + TAIL_SIZE


def test_a_claimed_part_record_no_longer_holds_its_checkpoint(tmp_path: Path) -> None:
    """A run that resumes and then dies leaves no checkpoint: the next one re-reads all."""
    from cowfleet.cache import metadata as md
    from cowfleet.cache.basesink import claim_part
    from cowfleet.cache.layout import Layout

    layout = Layout(tmp_path / "inst")
    layout.ensure_dirs()
    paths = layout.paths(ID)
    record = md.PartMeta(ID, 10 * LEAF, "sha512", "ab" * 64, "http://x", 1.0)
    (paths.part).write_bytes(os.urandom(5 * LEAF))
    md.write_atomic(paths.part_meta, replace(record, checked_by="k", checked=4 * LEAF).to_json())
    with safeopen.opened_dir(layout.base_dir) as dfd:
        sink = claim_part(dfd, paths, record, Inspector)
    try:
        assert sink.checkpoint() == Checkpoint("k", 4 * LEAF)
        on_disk = md.read_part_meta(paths.part_meta)
        assert on_disk is not None and (on_disk.checked_by, on_disk.checked) == (None, 0)
        sink.save_checkpoint(Checkpoint("k", 5 * LEAF))
        saved = md.read_part_meta(paths.part_meta)
        assert saved is not None and (saved.checked_by, saved.checked) == ("k", 5 * LEAF)
    finally:
        sink.close()
