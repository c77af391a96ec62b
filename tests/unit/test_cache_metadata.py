from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

from cowfleet.cache import metadata as md

META = md.BaseMeta(
    image_id="4f1c2b0e-8d7a-4c3e-9f10-0123456789ab",
    name="cirros",
    disk_format="qcow2",
    file_format="qcow2",
    image_size=10,
    file_size=10,
    virtual_size=100,
    hash_algo="sha512",
    hash_value="ab",
    file_hash_algo="sha512",
    file_hash_value="ab",
    fetched_at=1.0,
    source="http://x",
    verified_at=1.0,
)


def test_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    md.write_meta(p, META)
    assert md.read_meta(p) == META
    assert os.listdir(tmp_path) == ["m.json"]  # no temporary file left


def test_missing_or_garbage_reads_as_none(tmp_path: Path) -> None:
    assert md.read_meta(tmp_path / "nope.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert md.read_meta(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1]")
    assert md.read_meta(tmp_path / "list.json") is None


def test_symlinked_metadata_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    md.write_meta(real, META)
    os.symlink(real, tmp_path / "link.json")
    assert md.read_meta(tmp_path / "link.json") is None


def test_fifo_or_hard_link_at_a_metadata_path_reads_as_none_without_hanging(
    tmp_path: Path,
) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    got: list[object] = []
    reader = threading.Thread(
        target=lambda: got.append(md.read_json(tmp_path / "fifo.json")), daemon=True
    )
    reader.start()
    reader.join(timeout=5)
    assert got == [None]  # on a FIFO a plain open(O_RDONLY) waits for a writer forever
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"image_id": "x"}')
    os.link(elsewhere, tmp_path / "linked.json")
    assert md.read_json(tmp_path / "linked.json") is None


def test_readers_never_see_a_half_written_record(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    md.write_meta(p, META)
    stop = threading.Event()
    seen_bad = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            md.write_atomic(p, replace(META, name="x" * (i % 5000)).to_json(), durable=False)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(2000):
            if md.read_meta(p) is None:
                seen_bad.append(1)
    finally:
        stop.set()
        t.join()
    assert not seen_bad


def test_touch_sets_last_used(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    md.write_meta(p, META)
    md.touch(p, 1234567.0)
    assert md.last_used(p) == 1234567.0
    assert md.read_meta(p) == META
