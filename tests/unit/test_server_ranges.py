"""Range header parsing for image downloads (sans-I/O)."""

from __future__ import annotations

import pytest

from cowfleet.errors import ValidationError
from cowfleet.images.server.ranges import ByteRange, parse_range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", ByteRange(0, 9, 100)),
        ("bytes=10-", ByteRange(10, 99, 100)),
        ("bytes=-10", ByteRange(90, 99, 100)),
        ("bytes=-1000", ByteRange(0, 99, 100)),
        ("bytes=90-1000", ByteRange(90, 99, 100)),
        ("bytes=99-99", ByteRange(99, 99, 100)),
        (" bytes = 5 - 6 ", ByteRange(5, 6, 100)),
    ],
)
def test_single_ranges(header: str, expected: ByteRange) -> None:
    assert parse_range(header, 100) == expected


def test_no_header_means_whole_file() -> None:
    assert parse_range(None, 100) is None


def test_content_range_and_length() -> None:
    r = parse_range("bytes=10-19", 100)
    assert r is not None
    assert r.length == 10
    assert r.content_range == "bytes 10-19/100"


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=-0"])
def test_unsatisfiable_is_416_with_size(header: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_range(header, 100)
    assert err.value.context["http_status"] == 416
    assert err.value.context["headers"] == {"Content-Range": "bytes */100"}


def test_any_range_of_an_empty_file_is_unsatisfiable() -> None:
    with pytest.raises(ValidationError) as err:
        parse_range("bytes=-5", 0)
    assert err.value.context["http_status"] == 416


@pytest.mark.parametrize(
    "header", ["bytes=0-1,5-6", "bytes=1-0", "items=0-1", "bytes=", "bytes=-", "bytes=a-b", "0-1"]
)
def test_multi_range_and_garbage_are_400(header: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_range(header, 100)
    assert err.value.context["http_status"] == 400
