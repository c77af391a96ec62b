"""JSON-patch on image records: Glance v2.1 semantics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from cowfleet.errors import ConflictError, CowfleetError
from cowfleet.images.server.catalog import ImageRecord
from cowfleet.images.server.patch import apply_patch, parse_pointer

NOW = datetime(2026, 1, 1)


def record(**props: str) -> ImageRecord:
    return ImageRecord(
        id="0b8f1d2e-9a3c-4a6f-8d21-3c5b7e9f0a12",
        name="img",
        status="queued",
        disk_format="raw",
        container_format="bare",
        size=None,
        virtual_size=None,
        checksum=None,
        os_hash_algo=None,
        os_hash_value=None,
        min_disk=0,
        min_ram=0,
        visibility="shared",
        protected=False,
        owner=None,
        created_at=NOW,
        updated_at=NOW,
        properties=props,
    )


def status_of(exc: CowfleetError) -> Any:
    return exc.context.get("http_status")


def test_add_replace_base_fields_and_properties() -> None:
    res = apply_patch(
        record(os_type="linux"),
        [
            {"op": "replace", "path": "/name", "value": "new"},
            {"op": "add", "path": "/min_disk", "value": 2},
            {"op": "replace", "path": "/visibility", "value": "public"},
            {"op": "add", "path": "/protected", "value": True},
            {"op": "add", "path": "/kernel_id", "value": "k"},
            {"op": "replace", "path": "/os_type", "value": "windows"},
        ],
    )
    assert res.fields == {"name": "new", "min_disk": 2, "visibility": "public", "protected": True}
    assert res.properties == {"os_type": "windows", "kernel_id": "k"}


def test_add_overwrites_an_existing_property() -> None:
    res = apply_patch(record(a="1"), [{"op": "add", "path": "/a", "value": "2"}])
    assert res.properties == {"a": "2"}


def test_remove_property() -> None:
    res = apply_patch(record(a="1", b="2"), [{"op": "remove", "path": "/a"}])
    assert res.properties == {"b": "2"}


def test_pointer_escapes() -> None:
    assert parse_pointer("/a~1b~0c") == "a/b~c"
    res = apply_patch(record(), [{"op": "add", "path": "/x~1y", "value": "v"}])
    assert res.properties == {"x/y": "v"}


@pytest.mark.parametrize(
    ("ops", "status"),
    [
        ([{"op": "replace", "path": "/status", "value": "active"}], 403),
        ([{"op": "add", "path": "/checksum", "value": "x"}], 403),
        ([{"op": "add", "path": "/os_glance_x", "value": "x"}], 403),
        ([{"op": "add", "path": "/deleted", "value": "x"}], 403),
        ([{"op": "remove", "path": "/name"}], 403),
        ([{"op": "replace", "path": "/id", "value": "x"}], 403),
        ([{"op": "move", "path": "/name", "value": "x"}], 400),
        ([{"op": "add", "path": "name", "value": "x"}], 400),
        ([{"op": "add", "path": "/a/b", "value": "x"}], 400),
        ([{"op": "add", "path": "/name"}], 400),
        ([{"op": "add", "path": "/name", "value": "x" * 256}], 400),
        ([{"op": "add", "path": "/min_ram", "value": -1}], 400),
        ([{"op": "add", "path": "/min_ram", "value": 2**40}], 400),
        ([{"op": "add", "path": "/protected", "value": "yes"}], 400),
        ([{"op": "add", "path": "/disk_format", "value": "exe"}], 400),
        ([{"op": "add", "path": "/prop", "value": 5}], 400),
        ([{"op": "remove", "path": "/prop", "value": "x"}], 400),
        ({"op": "add"}, 400),
        (["add"], 400),
    ],
)
def test_refused_operations(ops: Any, status: int) -> None:
    with pytest.raises(CowfleetError) as err:
        apply_patch(record(), ops)
    assert status_of(err.value) == status


@pytest.mark.parametrize("op", ["replace", "remove"])
def test_missing_property_is_a_conflict(op: str) -> None:
    body = (
        [{"op": op, "path": "/nope", "value": "v"}]
        if op == "replace"
        else [{"op": op, "path": "/nope"}]
    )
    with pytest.raises(ConflictError):
        apply_patch(record(), body)


def test_patch_is_all_or_nothing() -> None:
    rec = record(a="1")
    with pytest.raises(CowfleetError):
        apply_patch(
            rec, [{"op": "remove", "path": "/a"}, {"op": "add", "path": "/size", "value": 1}]
        )
    assert rec.properties == {"a": "1"}
