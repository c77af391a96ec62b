"""The peer route's Range parser (sans-I/O)."""

from __future__ import annotations

import pytest

from cowfleet.node.peers import Unsatisfiable, parse_range


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (None, None),
        ("bytes=0-", (0, 99)),
        ("bytes=10-19", (10, 19)),
        ("bytes=90-500", (90, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=5-4", None),  # invalid: ignored, the whole image
        ("bytes=0-1,5-6", None),  # several ranges: the whole image
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_ranges(header: str | None, want: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == want


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, 100)
