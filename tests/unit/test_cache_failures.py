"""A failed fetch is shared with the callers that waited, as the same error class."""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet.cache import failures
from cowfleet.cache.layout import Layout
from cowfleet.errors import CowfleetError, IntegrityError
from cowfleet.fetch.retry import DeadlinePassed

IID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"


def _paths(tmp_path: Path):  # type: ignore[no-untyped-def]
    layout = Layout(tmp_path)
    layout.ensure_dirs()
    return layout.paths(IID)


@pytest.mark.parametrize("exc", [IntegrityError("sha512 mismatch"), DeadlinePassed("too slow")])
def test_a_waiter_raises_the_same_class(tmp_path: Path, exc: CowfleetError) -> None:
    paths = _paths(tmp_path)
    failures.record(paths, IID, exc, now=10.0)
    with pytest.raises(type(exc), match="while this one waited") as got:
        failures.raise_if_failed_since(paths, IID, since=5.0)
    assert type(got.value) is type(exc)


def test_an_older_failure_or_another_image_is_not_shared(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    failures.record(paths, IID, IntegrityError("x"), now=10.0)
    failures.raise_if_failed_since(paths, IID, since=11.0)
    failures.raise_if_failed_since(paths, "another", since=5.0)
    failures.clear(paths)
    failures.raise_if_failed_since(paths, IID, since=5.0)


def test_a_name_outside_the_error_tree_is_a_plain_cowfleet_error(tmp_path: Path) -> None:
    from cowfleet.cache import metadata as md

    paths = _paths(tmp_path)
    rec = md.FailureRecord(IID, "SystemExit", "planted", 10.0)
    md.write_atomic(paths.failed, rec.to_json(), durable=False)
    with pytest.raises(CowfleetError) as got:
        failures.raise_if_failed_since(paths, IID, since=5.0)
    assert type(got.value) is CowfleetError
