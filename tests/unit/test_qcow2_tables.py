"""The on-disk check of qcow2 table entries (cowfleet.formats.qcow2_tables).

Images are crafted here: the hostile corpus's header, refcount table and block, and
L1 table (clusters 0-3), then one L2 table (cluster 4) and data clusters after it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfleet.errors import ImageFormatError, LocalIOError, UnsafeImageError
from cowfleet.formats import qcow2_tables as qt
from cowfleet.formats.policy import FAILURE_CODES
from cowfleet.formats.qcow2 import parse_header
from tests.conftest import o_direct_works
from tests.unit.hostile_corpus import MIB, qcow2

CB = 12
CS = 1 << CB
RT, RB, L1, L2, DATA = CS, 2 * CS, 3 * CS, 4 * CS, 5 * CS
COPIED = 1 << 63
COMPRESSED = 1 << 62
EXTL2 = 1 << 4


@pytest.fixture(autouse=True, params=["fast", "entry-by-entry"])
def l2_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: with the whole-table L2 check, and with the loop alone."""
    if request.param != "fast":
        monkeypatch.setattr(qt, "MAX_META_SET", -1)
    return str(request.param)


def image(
    *, clusters: int = 3, ext: bool = False, snapshots: int = 0, compressed: bool = True
) -> bytearray:
    """A valid image: L1[0] -> L2 at cluster 4; L2[i] -> data cluster 5+i (last compressed)."""
    out = bytearray(qcow2(size=MIB, cluster_bits=CB, incompat=EXTL2 if ext else 0))
    out += bytes(CS)  # the L2 table
    struct.pack_into(">Q", out, L1, L2 | COPIED)
    step = 16 if ext else 8
    for i in range(clusters):
        off = DATA + i * CS
        out += bytes([0x5A + i]) * CS
        struct.pack_into(">Q", out, L2 + i * step, off | COPIED)
        if ext:
            struct.pack_into(">Q", out, L2 + i * step + 8, 0xFFFF_FFFF)
    if compressed:
        # Two compressed clusters sharing one host cluster, the second one ending in
        # the file's last (partial) sector.
        host = len(out)
        out += b"\x78" * 1000
        put_compressed(out, clusters * step, host, 700)
        put_compressed(out, (clusters + 1) * step, host + 700, 300)
    return out


def put_compressed(out: bytearray, l2_pos: int, host: int, nbytes: int) -> None:
    x = 62 - (CB - 8)
    extra = (host + nbytes - 1) // 512 - host // 512
    struct.pack_into(">Q", out, L2 + l2_pos, COMPRESSED | (extra << x) | host)


def check(data: bytes | bytearray) -> qt.TableCheck:
    buf = bytes(data)
    h = parse_header(buf[:CS], file_size=len(buf))
    return qt.check_tables(h, lambda off, n: buf[off : off + n], len(buf), image_id="img-1")


def refused(data: bytes | bytearray, code: str) -> UnsafeImageError:
    with pytest.raises(UnsafeImageError) as info:
        check(data)
    err = info.value
    assert [f.code for f in err.failures] == [code], err
    assert code in FAILURE_CODES
    assert code in str(err) and err.context["image_id"] == "img-1"
    assert isinstance(err.context["table"], str) and isinstance(err.context["offset"], int)
    return err


def test_valid_image_passes() -> None:
    r = check(image())
    assert (r.l1_tables, r.l2_tables, r.data_clusters, r.compressed_clusters) == (1, 1, 3, 2)
    assert r.refcount_blocks == 1


def test_whole_table_check_agrees_with_the_loop(
    l2_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bool] = []
    fast = qt._Checker.l2_table_fast

    def spy(self: qt._Checker, buf: bytes) -> bool:
        taken.append(fast(self, buf))
        return taken[-1]

    monkeypatch.setattr(qt._Checker, "l2_table_fast", spy)
    data = image(compressed=False, clusters=40)
    struct.pack_into(">Q", data, L2 + 50 * 8, 1)  # a zero cluster (bit 0), no offset
    struct.pack_into(">Q", data, L2 + 51 * 8, DATA | 1)  # preallocated zero cluster
    r = check(data)
    assert (r.data_clusters, r.compressed_clusters) == (41, 0)
    assert taken == ([True] if l2_path == "fast" else [False])


def test_valid_extended_l2_image_passes() -> None:
    r = check(image(ext=True))
    assert (r.l2_tables, r.data_clusters, r.compressed_clusters) == (1, 3, 2)


def test_l1_entry_past_eof() -> None:
    data = image()
    struct.pack_into(">Q", data, L1, (len(data) + 64 * CS) & ~(CS - 1) | COPIED)
    err = refused(data, "l2-table-past-end")
    assert err.context["table"] == "L2 table named by L1 table entry 0"
    assert "past the end of the file" in str(err)


def test_l2_entry_past_eof() -> None:
    data = image()
    struct.pack_into(">Q", data, L2 + 8, (100 * CS) | COPIED)
    err = refused(data, "data-cluster-past-end")
    assert err.context == {"image_id": "img-1", "table": "L2 table", "offset": L2 + 8}
    assert f"L2 table at offset {L2}, entry 1" in str(err) and str(100 * CS) in str(err)


def test_refcount_entry_past_eof() -> None:
    data = image()
    struct.pack_into(">Q", data, RT + 8, 1000 * CS)
    err = refused(data, "refcount-block-past-end")
    assert "refcount table entry 1" in str(err) and str(1000 * CS) in str(err)


@pytest.mark.parametrize(
    ("cut", "code"),
    [
        (L2 + CS // 2, "l2-table-past-end"),  # the L2 table cut in half
        (L1 + 4, "l1-table-past-end"),  # the L1 table cut
        (DATA + CS, "data-cluster-past-end"),  # the second data cluster missing
    ],
)
def test_truncated_file(cut: int, code: str) -> None:
    refused(image()[:cut], code)


def test_compressed_cluster_past_eof() -> None:
    data = image()
    put_compressed(data, 3 * 8, len(data) - 100, 4000)  # needs 8 sectors past the end
    err = refused(data, "compressed-cluster-past-end")
    assert "compressed cluster" in str(err)
    data = image()
    put_compressed(data, 3 * 8, len(data) + 600, 100)  # starts past the end
    refused(data, "compressed-cluster-past-end")


def test_compressed_cluster_in_a_partial_last_sector_passes() -> None:
    data = image()
    assert len(data) % 512  # the second compressed cluster ends inside a cut sector
    check(data)


@pytest.mark.parametrize(
    ("where", "value", "code"),
    [
        (L1, L2 | 1, "table-entry-reserved-bits"),
        (L1, L2 | (1 << 60), "table-entry-reserved-bits"),
        (L2, DATA | 2 | COPIED, "table-entry-reserved-bits"),
        (L2, DATA | COPIED | COMPRESSED | (1 << 57), "table-entry-reserved-bits"),
        (RT, RB | 8, "table-entry-reserved-bits"),
        (L2, DATA + 512 | COPIED, "table-unaligned"),
        (L1, L2 + 512, "table-unaligned"),
        (RT, RB + 512, "table-unaligned"),
        (L2, COPIED, "metadata-overlap"),  # data cluster "at offset 0": the header
        (L2, L1 | COPIED, "metadata-overlap"),  # data cluster on the L1 table
        (L2, L2 | COPIED, "metadata-overlap"),  # data cluster on the L2 table itself
        (L2, RB | COPIED, "metadata-overlap"),  # data cluster on a refcount block
        (L1, RT | COPIED, "metadata-overlap"),  # L2 table on the refcount table
        (L1, L1 | COPIED, "metadata-overlap"),  # L2 table on the L1 table
        (RT, L2, "metadata-overlap"),  # refcount block on the L2 table
        (RT + 8, RB, "metadata-overlap"),  # two refcount blocks at one place
    ],
)
def test_bad_entries(where: int, value: int, code: str) -> None:
    data = image(compressed=False)
    struct.pack_into(">Q", data, where, value)
    refused(data, code)


def test_compressed_cluster_on_metadata() -> None:
    data = image()
    put_compressed(data, 3 * 8, RB + 100, 200)
    refused(data, "metadata-overlap")


def test_extended_l2_bitmap_rules() -> None:
    data = image(ext=True, compressed=False)
    struct.pack_into(">QQ", data, L2 + 5 * 16, 0, 1)  # allocated subcluster, no cluster
    refused(data, "table-entry-reserved-bits")
    data = image(ext=True, compressed=False)
    struct.pack_into(">Q", data, L2 + 16, DATA + CS | COPIED | 1)  # bit 0 reserved with ext L2
    refused(data, "table-entry-reserved-bits")
    data = image(ext=True)
    struct.pack_into(">Q", data, L2 + 3 * 16 + 8, 1)  # compressed cluster with a bitmap
    refused(data, "table-entry-reserved-bits")
    data = image(ext=True, compressed=False)
    struct.pack_into(">QQ", data, L2 + 5 * 16, 0, 1 << 40)  # reads-as-zero bits are fine
    check(data)


def _with_snapshot(l1_offset: int, l1_entries: list[int]) -> bytearray:
    """The valid image plus a snapshot table (cluster after the data) and its L1 table."""
    data = image(compressed=False)
    table = len(data)
    data += bytes(CS)
    head = struct.pack(">QIHHIIQII", l1_offset, len(l1_entries), 2, 4, 0, 0, 0, 0, 16)
    entry = head + bytes(16) + b"s1" + b"snap"
    data[table : table + len(entry)] = entry
    data += bytes(CS)  # room for its L1 table, written when it goes there
    if l1_offset == len(data) - CS:
        for i, e in enumerate(l1_entries):
            struct.pack_into(">Q", data, l1_offset + i * 8, e)
    struct.pack_into(">IQ", data, 60, 1, table)  # nb_snapshots, snapshots_offset
    return data


def test_snapshot_l1_tables_are_checked() -> None:
    here = len(image(compressed=False)) + CS
    r = check(_with_snapshot(here, [L2]))  # shares the active L2 table
    assert (r.l1_tables, r.l2_tables) == (2, 1)
    refused(_with_snapshot(here, [L2 + 64 * CS]), "l2-table-past-end")
    refused(_with_snapshot(here + 256 * CS, [L2]), "l1-table-past-end")
    refused(_with_snapshot(L1, [L2]), "metadata-overlap")
    data = _with_snapshot(here, [L2])
    struct.pack_into(">I", data, 60, 70_000)  # more snapshots than qemu allows
    assert "70000 snapshots" in str(refused(data, "invalid-header"))


class Recorder:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


def test_reads_only_tables_in_bounded_pieces() -> None:
    # A large L1 table (512 KiB of mostly empty entries) and many data clusters: the
    # tables are read in pieces of at most READ_STEP bytes or one cluster, and no
    # data cluster is read.
    data = image(compressed=False, clusters=64)
    buf = bytes(data)
    h = parse_header(buf[:CS], file_size=len(buf))
    rec = Recorder(buf)
    qt.check_tables(h, rec, len(buf))
    assert all(n <= max(qt.READ_STEP, CS) for _off, n in rec.reads)
    data_range = range(DATA, DATA + 64 * CS)
    assert not [r for r in rec.reads if r[0] in data_range]
    assert sorted({off for off, _n in rec.reads}) == [RT, L1, L2]

    big_l1 = 300_000  # entries: 2.3 MiB, read in three pieces
    data = bytearray(qcow2(size=big_l1 * 512 * CS, cluster_bits=CB, pad_to=L1 + big_l1 * 8))
    buf = bytes(data)
    h = parse_header(buf[:CS], file_size=len(buf))
    rec = Recorder(buf)
    assert h.l1_size == big_l1
    qt.check_tables(h, rec, len(buf))
    l1_reads = [n for off, n in rec.reads if L1 <= off < L1 + big_l1 * 8]
    assert sum(l1_reads) == big_l1 * 8 * 2  # pass 1 marks, pass 2 walks
    assert max(l1_reads) == qt.READ_STEP


def test_short_read_is_an_error() -> None:
    buf = bytes(image())
    h = parse_header(buf[:CS], file_size=len(buf))
    with pytest.raises(ImageFormatError, match="short read"):
        qt.check_tables(h, lambda off, n: buf[off : off + n][: n // 2], len(buf))


def test_check_file_and_symlink(tmp_path: Path) -> None:
    good = tmp_path / "good.qcow2"
    good.write_bytes(image())
    assert qt.check_file(good).data_clusters == 3
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert qt.check_file("good.qcow2", dir_fd=dir_fd).compressed_clusters == 2
    finally:
        os.close(dir_fd)
    bad = tmp_path / "bad.qcow2"
    data = image()
    struct.pack_into(">Q", data, L2, (100 * CS) | COPIED)
    bad.write_bytes(data)
    with pytest.raises(UnsafeImageError, match="data-cluster-past-end") as info:
        qt.check_file(bad, image_id="x")
    assert info.value.context["image_id"] == "x"
    link = tmp_path / "link.qcow2"
    link.symlink_to(good)
    with pytest.raises(LocalIOError):
        qt.check_file(link)


@pytest.mark.parametrize("direct", [False, True])
def test_staged_upload_is_checked_with_its_buffered_tail(tmp_path: Path, direct: bool) -> None:
    # With O_DIRECT the last partial block of an upload waits in a buffer until the
    # store commits; the check must see it (this image ends in a compressed cluster).
    from cowfleet.images.server.store import FilesystemStore
    from cowfleet.images.server.upload import check_qcow2_tables

    store = FilesystemStore(tmp_path / "images", tmp_path / "staging", direct_io=direct)
    data = bytes(image())
    assert len(data) % 4096
    staged = store.begin_write("4b0e4f8e-3a52-4c3b-9f0e-2f0c7a1d9a11")
    assert staged.direct == (direct and o_direct_works(tmp_path))
    staged.write(data)
    check_qcow2_tables(staged)
    store.commit(staged)
    assert store.path(staged.image_id).read_bytes() == data

    bad = bytearray(data)
    struct.pack_into(">Q", bad, L2, (100 * CS) | COPIED)
    staged = store.begin_write("4b0e4f8e-3a52-4c3b-9f0e-2f0c7a1d9a12")
    staged.write(bytes(bad))
    with pytest.raises(UnsafeImageError, match="data-cluster-past-end") as info:
        check_qcow2_tables(staged)
    assert info.value.context["image_id"] == staged.image_id
    store.abort(staged)


def test_disk_inspect_runs_the_table_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cowfleet.cli.main import main

    monkeypatch.setenv("COWFLEET_HOME", str(tmp_path / "home"))
    good = tmp_path / "good.qcow2"
    good.write_bytes(image())
    assert main(["disk", "inspect", "--declared-format", "qcow2", str(good)]) == 0
    bad = tmp_path / "bad.qcow2"
    data = image()
    struct.pack_into(">Q", data, L1, (200 * CS) | COPIED)
    bad.write_bytes(data)
    capsys.readouterr()
    args = ["disk", "inspect", "--output", "json", "--declared-format", "qcow2", str(bad)]
    assert main(args) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["safe"] is False
    assert [f["code"] for f in out["failures"]] == ["l2-table-past-end"]


# (offset, format) of the header fields that place tables: l1_size, l1_table_offset,
# refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset.
HEADER_FIELDS = [(36, ">I"), (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q")]
_SEEDS = [bytes(image()), bytes(image(ext=True)), bytes(_with_snapshot(9 * CS, [L2]))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(
        st.tuples(st.integers(0, 12 * CS), st.integers(0, 2**64 - 1)), min_size=1, max_size=6
    ),
    header=st.lists(st.tuples(st.sampled_from(HEADER_FIELDS), st.integers(0, 2**64 - 1))),
    cut=st.one_of(st.none(), st.integers(CS, 12 * CS)),
)
def test_hostile_entries_never_crash(
    seed: bytes,
    edits: list[tuple[int, int]],
    header: list[tuple[tuple[int, str], int]],
    cut: int | None,
) -> None:
    """Any values in the table fields of the header and anywhere past it: a verdict
    (or a header qemu would refuse), never a crash, and no more reading than the file."""
    data = bytearray(seed)
    for (offset, fmt), value in header:
        struct.pack_into(fmt, data, offset, value % (1 << (8 * struct.calcsize(fmt))))
    for where, value in edits:
        where = CS + (where & ~7) % max(8, len(data) - CS - 8)
        struct.pack_into(">Q", data, where, value)
    if cut is not None:
        del data[cut:]
    try:
        h = parse_header(bytes(data[:CS]), file_size=len(data))
    except ImageFormatError:
        return
    rec = Recorder(bytes(data))
    try:
        qt.check_tables(h, rec, len(data))
    except UnsafeImageError as exc:
        assert exc.failures[0].code in FAILURE_CODES
    except ImageFormatError as exc:
        assert "short read" not in str(exc)  # the file did not change
    assert sum(n for _off, n in rec.reads) <= 4 * len(data)
    assert all(n <= max(qt.READ_STEP, CS) for _off, n in rec.reads)
