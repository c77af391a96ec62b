"""The safety policy over the byte-built hostile corpus, plus focused rules."""

from __future__ import annotations

import pytest

from cowfleet.errors import UnsafeImageError
from cowfleet.formats.inspection import GLANCE_DISK_FORMATS
from cowfleet.formats.inspector import inspect_bytes
from cowfleet.formats.policy import FAILURE_CODES, check
from tests.unit import hostile_corpus as hc

CASES = hc.corpus()


def test_corpus_is_large_enough() -> None:
    hostile = [c for c in CASES if not c.safe]
    assert len(hostile) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_verdicts(case: hc.Case) -> None:
    verdict = check(case.declared, inspect_bytes(case.data))
    codes = {f.code for f in verdict.failures}
    assert codes == case.codes, verdict.failures
    assert verdict.safe is case.safe
    for f in verdict.failures:
        assert f.message and f.code in f"{f.code}"


@pytest.mark.parametrize("case", [c for c in CASES if not c.safe], ids=lambda c: c.name)
def test_raise_if_unsafe_names_every_failure(case: hc.Case) -> None:
    verdict = check(case.declared, inspect_bytes(case.data))
    with pytest.raises(UnsafeImageError) as ei:
        verdict.raise_if_unsafe(image_id="x")
    for code in case.codes:
        assert code in str(ei.value)
    assert {f.code for f in ei.value.failures} == case.codes


def test_policy_codes_are_documented() -> None:
    for case in CASES:
        for code in case.codes:
            assert code in FAILURE_CODES, code


def test_virtual_size_cap_is_configurable() -> None:
    insp = inspect_bytes(hc.qcow2(size=10 * hc.GIB))
    assert check("qcow2", insp).safe
    v = check("qcow2", insp, max_virtual_size=hc.GIB)
    assert [f.code for f in v.failures] == ["virtual-size-too-large"]
    assert str(10 * hc.GIB) in v.failures[0].message


def test_raw_cap_applies_to_data_size() -> None:
    insp = inspect_bytes(b"\1" * 4096)
    assert [f.code for f in check("raw", insp, max_virtual_size=1024).failures] == [
        "virtual-size-too-large"
    ]


@pytest.mark.parametrize("declared", ["aki", "ari", "ami", "raw"])
def test_raw_aliases_accept_plain_bytes(declared: str) -> None:
    assert check(declared, inspect_bytes(b"kernel bytes" * 100)).safe


@pytest.mark.parametrize("declared", sorted(GLANCE_DISK_FORMATS))
def test_qcow2_bytes_only_pass_as_qcow2(declared: str) -> None:
    verdict = check(declared, inspect_bytes(hc.qcow2()))
    assert verdict.safe is (declared == "qcow2")
    assert verdict.detected_format == "qcow2"


def test_iso_declared_raw_is_raw_bytes_to_qemu() -> None:
    assert check("raw", inspect_bytes(hc.iso())).safe
    assert check("iso", inspect_bytes(hc.iso(mbr=True))).safe
    assert not check("iso", inspect_bytes(hc.mbr_disk())).safe


def test_incomplete_inspection_is_refused() -> None:
    from cowfleet.formats.inspector import Inspector

    insp = Inspector()
    insp.feed(hc.vhdx()[: 1 << 20])
    result = insp.finish(total_size=len(hc.vhdx()))
    codes = {f.code for f in check("vhdx", result).failures}
    assert "incomplete" in codes
