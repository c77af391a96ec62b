"""Microversion headers: Nova's two headers, ``latest``, 400 malformed, 406 out of range."""

from __future__ import annotations

import pytest

from cowfleet.api.microversion import (
    MAX_VERSION,
    MIN_VERSION,
    MalformedVersion,
    UnsupportedVersion,
    Version,
    parse,
    requested,
)


@pytest.mark.parametrize(
    ("openstack", "legacy", "expected"),
    [
        ([], [], MIN_VERSION),
        (["compute 2.81"], [], Version(2, 81)),
        (["compute 2.47"], ["2.10"], Version(2, 47)),  # the new header wins
        ([], ["2.53"], Version(2, 53)),
        (["volume 3.1, compute 2.61"], [], Version(2, 61)),
        (["image 2.5"], ["2.9"], Version(2, 9)),  # no compute entry: the legacy header
        (["compute latest"], [], MAX_VERSION),
        ([], ["latest"], MAX_VERSION),
        (["COMPUTE 2.2"], [], Version(2, 2)),
    ],
)
def test_requested_version(openstack: list[str], legacy: list[str], expected: Version) -> None:
    assert requested(openstack, legacy) == expected


@pytest.mark.parametrize(
    "bad", ["compute 2", "compute x.y", "compute 2.01", "compute 2.1.1", "compute", "compute -2.1"]
)
def test_malformed_is_refused(bad: str) -> None:
    with pytest.raises(MalformedVersion):
        requested([bad], [])


@pytest.mark.parametrize("out", ["compute 2.0", "compute 2.82", "compute 3.1", "compute 1.1"])
def test_out_of_range_is_refused_naming_the_range(out: str) -> None:
    with pytest.raises(UnsupportedVersion, match=r"Minimum is 2\.1 and maximum is 2\.81"):
        requested([out], [])


def test_versions_compare_numerically() -> None:
    assert parse("2.10") > parse("2.9")
    assert Version(2, 47).at_least("2.47") and not Version(2, 46).at_least("2.47")
    assert Version(2, 81) <= MAX_VERSION
