"""Property tests: chunking never changes the verdict; hostile bytes never crash it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfleet.formats.inspection import GLANCE_DISK_FORMATS
from cowfleet.formats.inspector import MAX_CAPTURE, Inspector, inspect_bytes, inspect_path
from cowfleet.formats.policy import check
from tests.unit import hostile_corpus as hc

SEEDS = [c.data for c in hc.corpus() if len(c.data) <= 300_000]
SEEDS += [hc.vhd_dynamic(), hc.vmdk_sparse(), hc.luks2(), hc.vdi(), hc.qed(), hc.qcow1()]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def judge(data: bytes) -> None:
    """Inspect and judge. Malformed input becomes findings: nothing at all may raise
    (stricter than the contract, which allows cowfleet errors)."""
    insp = inspect_bytes(data)
    assert insp.data_size == len(data)
    for declared in GLANCE_DISK_FORMATS:
        verdict = check(declared, insp)
        assert all(f.code and f.message for f in verdict.failures)


def feed_cuts(data: bytes, cuts: list[int]) -> Inspector:
    insp = Inspector()
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for p in [*points, len(data)]:
        insp.feed(data[start:p])
        start = p
    return insp


@FUZZ
@given(seed=st.sampled_from(SEEDS), cuts=st.lists(st.integers(0, 1 << 22), max_size=40))
def test_random_chunking_gives_identical_inspection(seed: bytes, cuts: list[int]) -> None:
    assert feed_cuts(seed, cuts).finish() == inspect_bytes(seed)


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=16),
    far_edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1 << 18)),
)
def test_mutated_images_never_crash(
    seed: bytes, edits: list[tuple[int, int]], far_edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(seed)
    for off, val in [*edits, *far_edits]:
        if off < len(data):
            data[off] = val
    if cut is not None:
        del data[cut:]
    judge(bytes(data))


@FUZZ
@given(
    magic=st.sampled_from(
        [
            b"QFI\xfb",
            b"QED\0",
            b"KDMV",
            b"COWD",
            b"conectix",
            b"vhdxfile",
            b"LUKS\xba\xbe",
            b"# Disk DescriptorFile\nversion=1\ncreateType=",
            b"",
        ]
    ),
    body=st.binary(max_size=2048),
)
def test_random_bytes_behind_magic_never_crash(magic: bytes, body: bytes) -> None:
    judge(magic + body)


@FUZZ
@given(data=st.binary(max_size=70_000), chunk=st.integers(1, 9000))
def test_random_bytes_bounded_memory(data: bytes, chunk: int) -> None:
    insp = Inspector()
    for i in range(0, len(data), chunk):
        insp.feed(data[i : i + chunk])
    held = sum(len(v) for v in insp._regions.values())
    held += sum(len(b) for _n, b in insp._pending.values())
    assert held <= MAX_CAPTURE
    assert insp.finish().data_size == len(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 1 << 18)),
)
def test_inspect_path_equals_streaming_on_mutants(
    seed: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(seed)
    for off, val in edits:
        if off < len(data):
            data[off] = val
    if cut is not None:
        del data[cut:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "img"
        path.write_bytes(data)
        assert inspect_path(path) == inspect_bytes(bytes(data))
