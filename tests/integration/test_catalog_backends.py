"""The catalog's contract on both backends: SQLite (file, WAL) and PostgreSQL.

PostgreSQL comes from ``scripts/setup/postgres.sh`` (``COWFLEET_TEST_POSTGRES_URL``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from cowfleet.errors import ConflictError, NotFoundError, UsageError
from cowfleet.images.server.access import ListScope
from cowfleet.images.server.catalog import Base, Catalog, MemberRow
from tests.conftest import require_env

pytestmark = pytest.mark.integration


class Clock:
    """Deterministic, strictly increasing timestamps."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        url = require_env("COWFLEET_TEST_POSTGRES_URL")
    cat = Catalog.open(url, clock=Clock())
    if request.param == "postgresql":
        Base.metadata.drop_all(cat.engine)
        Base.metadata.create_all(cat.engine)
    yield cat
    if request.param == "postgresql":
        Base.metadata.drop_all(cat.engine)
    cat.close()


def new_id() -> str:
    return str(uuid.uuid4())


def make(cat: Catalog, name: str | None, **fields: object) -> str:
    iid = new_id()
    cat.create(
        iid,
        fields={"name": name, "disk_format": "raw", "container_format": "bare", **fields},
        properties={"os_type": "linux"},
        tags=("a", "a", "b"),
    )
    return iid


def test_create_and_get_round_trip(catalog: Catalog) -> None:
    iid = make(catalog, "one", min_disk=3, protected=True)
    rec = catalog.get(iid)
    assert (rec.name, rec.status, rec.min_disk, rec.protected) == ("one", "queued", 3, True)
    assert rec.properties == {"os_type": "linux"}
    assert rec.tags == ("a", "b")
    assert rec.created_at == rec.updated_at
    assert rec.size is None and rec.checksum is None


def test_duplicate_id_conflicts(catalog: Catalog) -> None:
    iid = make(catalog, "x")
    with pytest.raises(ConflictError):
        catalog.create(iid, fields={"name": "y"})
    assert catalog.get(iid).name == "x"


def test_unknown_id_not_found(catalog: Catalog) -> None:
    with pytest.raises(NotFoundError):
        catalog.get(new_id())


def test_upload_state_machine(catalog: Catalog) -> None:
    iid = make(catalog, "img")
    assert catalog.claim_upload(iid).status == "saving"
    with pytest.raises(ConflictError):
        catalog.claim_upload(iid)  # second uploader loses
    catalog.release_upload(iid)
    assert catalog.get(iid).status == "queued"
    catalog.claim_upload(iid)
    rec = catalog.finish_upload(
        iid,
        size=10,
        virtual_size=20,
        checksum="c" * 32,
        os_hash_algo="sha512",
        os_hash_value="h" * 128,
    )
    assert (rec.status, rec.size, rec.virtual_size) == ("active", 10, 20)
    with pytest.raises(ConflictError):
        catalog.claim_upload(iid)  # already active


def test_only_one_of_many_concurrent_claims_wins(catalog: Catalog) -> None:
    iid = make(catalog, "race")
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def claim() -> None:
        barrier.wait()
        try:
            catalog.claim_upload(iid)
            wins.append(True)
        except ConflictError:
            wins.append(False)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]


def test_finish_after_delete_reports_not_found(catalog: Catalog) -> None:
    iid = make(catalog, "gone")
    catalog.claim_upload(iid)
    catalog.delete(iid)
    with pytest.raises(NotFoundError):
        catalog.finish_upload(
            iid, size=1, virtual_size=1, checksum="c", os_hash_algo="sha512", os_hash_value="h"
        )


def test_protected_image_is_not_deleted(catalog: Catalog) -> None:
    iid = make(catalog, "keep", protected=True)
    with pytest.raises(ConflictError) as err:
        catalog.delete(iid)
    assert err.value.context["reason"] == "protected"
    assert catalog.get(iid).name == "keep"
    with pytest.raises(NotFoundError):
        catalog.delete(new_id())


def test_reset_saving(catalog: Catalog) -> None:
    a, b = make(catalog, "a"), make(catalog, "b")
    catalog.claim_upload(a)
    assert catalog.reset_saving() == 1
    assert catalog.get(a).status == "queued" and catalog.get(b).status == "queued"


def test_update_replaces_fields_and_properties(catalog: Catalog) -> None:
    iid = make(catalog, "u")
    before = catalog.get(iid)
    rec = catalog.update(
        iid, fields={"name": "v", "min_ram": 512}, properties={"kernel_id": "k"}, tags=("t",)
    )
    assert (rec.name, rec.min_ram, dict(rec.properties), rec.tags) == (
        "v",
        512,
        {"kernel_id": "k"},
        ("t",),
    )
    assert rec.updated_at > before.updated_at
    with pytest.raises(NotFoundError):
        catalog.update(new_id(), fields={}, properties={})


def test_formats_change_only_while_queued(catalog: Catalog) -> None:
    iid = make(catalog, "f")
    assert (
        catalog.update(iid, fields={"disk_format": "qcow2"}, properties={}).disk_format == "qcow2"
    )
    catalog.claim_upload(iid)
    for fields in ({"disk_format": "raw"}, {"container_format": "ovf"}, {"disk_format": "qcow2"}):
        with pytest.raises(ConflictError) as exc:
            catalog.update(iid, fields={"name": "renamed", **fields}, properties={"p": "v"})
        assert exc.value.context["reason"] == "not queued"
        assert exc.value.context["status"] == "saving"
    rec = catalog.get(iid)
    assert (rec.disk_format, rec.container_format, rec.name) == ("qcow2", "bare", "f")
    assert rec.properties == {}  # the refused updates wrote nothing
    assert catalog.update(iid, fields={"name": "ok"}, properties={}).name == "ok"
    catalog.finish_upload(
        iid, size=1, virtual_size=1, checksum="c", os_hash_algo="sha512", os_hash_value="h"
    )
    with pytest.raises(ConflictError):
        catalog.update(iid, fields={"container_format": "ovf"}, properties={})
    with pytest.raises(NotFoundError):
        catalog.update(new_id(), fields={"disk_format": "raw"}, properties={})
    assert catalog.active_ids() == {iid}


def test_pagination_visits_every_image_once_in_order(catalog: Catalog) -> None:
    names = ["b", None, "a", "c", "a", "d", None]
    ids = {make(catalog, n) for n in names}
    for key, direction in (
        ("name", "asc"),
        ("name", "desc"),
        ("created_at", "desc"),
        ("id", "asc"),
        ("size", "asc"),
    ):
        seen: list[str] = []
        marker = None
        while True:
            page, more = catalog.list_page(sort_key=key, sort_dir=direction, limit=2, marker=marker)
            seen += [r.id for r in page]
            if not more:
                break
            marker = page[-1].id
        assert len(seen) == len(ids) and set(seen) == ids, (key, direction)
        records = [catalog.get(i) for i in seen]
        values = [getattr(r, key) for r in records]
        if key == "name":
            values = [v or "" for v in values]
        if key != "size":
            assert values == sorted(values, reverse=direction == "desc"), (key, direction)


def test_filters(catalog: Catalog) -> None:
    a = make(catalog, "same")
    b = make(catalog, "same", visibility="public")
    make(catalog, "other")
    page, _ = catalog.list_page(filters={"name": "same"}, limit=10)
    assert {r.id for r in page} == {a, b}
    page, _ = catalog.list_page(filters={"name": "same", "visibility": "public"}, limit=10)
    assert [r.id for r in page] == [b]
    page, _ = catalog.list_page(filters={"status": "active"}, limit=10)
    assert page == []


def test_bad_list_arguments(catalog: Catalog) -> None:
    with pytest.raises(UsageError):
        catalog.list_page(sort_key="checksum; drop table images")
    with pytest.raises(UsageError):
        catalog.list_page(sort_dir="sideways")
    with pytest.raises(UsageError):
        catalog.list_page(filters={"os_type": "linux"})
    with pytest.raises(NotFoundError):
        catalog.list_page(marker=new_id())


def test_data_survives_reopening(catalog: Catalog) -> None:
    iid = make(catalog, "durable")
    url = catalog.engine.url.render_as_string(hide_password=False)
    catalog.engine.dispose()
    again = Catalog.open(url)
    try:
        assert again.get(iid).name == "durable"
        with again.engine.connect() as conn:
            if again.engine.dialect.name == "sqlite":
                mode = conn.execute(text("PRAGMA journal_mode")).scalar()
                assert mode == "wal"
    finally:
        again.close()


def test_members_of_a_shared_image(catalog: Catalog) -> None:
    iid = make(catalog, "shared", owner="alpha", visibility="shared")
    assert catalog.membership(iid, "beta") is None
    first = catalog.add_member(iid, "beta")
    assert (first.member, first.status) == ("beta", "pending")
    with pytest.raises(ConflictError):
        catalog.add_member(iid, "beta")
    with pytest.raises(NotFoundError):
        catalog.add_member(new_id(), "beta")
    catalog.add_member(iid, "gamma")
    assert [m.member for m in catalog.list_members(iid)] == ["beta", "gamma"]
    accepted = catalog.set_member_status(iid, "beta", "accepted")
    assert accepted.status == "accepted" and accepted.updated_at > first.updated_at
    assert catalog.membership(iid, "beta") == "accepted"
    catalog.remove_member(iid, "gamma")
    with pytest.raises(NotFoundError):
        catalog.remove_member(iid, "gamma")
    with pytest.raises(NotFoundError):
        catalog.set_member_status(iid, "gamma", "accepted")
    catalog.delete(iid)
    assert catalog.list_members(iid) == []


def test_list_scope_follows_projects_and_members(catalog: Catalog) -> None:
    ids = {
        v: make(catalog, "scoped", owner="alpha", visibility=v)
        for v in ("private", "public", "shared", "community")
    }
    pending = make(catalog, "scoped", owner="alpha", visibility="shared")
    catalog.add_member(ids["shared"], "beta")
    catalog.set_member_status(ids["shared"], "beta", "accepted")
    catalog.add_member(pending, "beta")
    own = make(catalog, "scoped", owner="beta", visibility="private")

    def names(scope: ListScope) -> set[str]:
        page, _ = catalog.list_page(filters={"name": "scoped"}, limit=100, scope=scope)
        return {r.id for r in page}

    beta = ListScope(everything=False, project="beta")
    assert names(beta) == {ids["public"], ids["shared"], own}
    assert names(ListScope(everything=False, project="beta", member_status=None)) == {
        ids["public"],
        ids["shared"],
        pending,
        own,
    }
    assert names(ListScope(everything=False, project="beta", community=True)) == {
        ids["public"],
        ids["shared"],
        ids["community"],
        own,
    }
    assert names(ListScope(everything=False, project="alpha")) == {*ids.values(), pending}
    assert names(ListScope(everything=True)) == {*ids.values(), pending, own}


def test_an_older_catalog_gains_the_members_table(catalog: Catalog) -> None:
    """A catalog made before image members existed (no ``image_members`` table) is
    migrated on its next open, its images kept."""
    iid = make(catalog, "old", owner="alpha", visibility="shared")
    MemberRow.__table__.drop(catalog.engine)  # type: ignore[attr-defined]
    url = catalog.engine.url.render_as_string(hide_password=False)
    catalog.engine.dispose()
    again = Catalog.open(url)
    try:
        assert again.get(iid).name == "old"
        assert again.add_member(iid, "beta").status == "pending"
        assert again.membership(iid, "beta") == "pending"
    finally:
        again.close()


def test_open_adds_the_tree_columns_to_an_older_catalog(catalog: Catalog) -> None:
    """A catalog written before hash trees (no tree columns) gains them on open, on both
    backends; its images read as having no tree, new uploads store one."""
    old = make(catalog, "old")
    with catalog.engine.begin() as conn:
        conn.execute(text("ALTER TABLE images DROP COLUMN tree_sha256"))
        conn.execute(text("ALTER TABLE images DROP COLUMN tree_leaf_size"))
    url = catalog.engine.url.render_as_string(hide_password=False)
    again = Catalog.open(url, clock=Clock())
    try:
        rec = again.get(old)
        assert (rec.tree_sha256, rec.tree_leaf_size) == (None, None)
        assert rec.properties == {"os_type": "linux"}
        again.claim_upload(old)
        rec = again.finish_upload(
            old,
            size=1,
            virtual_size=1,
            checksum="c",
            os_hash_algo="sha512",
            os_hash_value="h",
            tree_sha256="ab" * 32,
            tree_leaf_size=4 << 20,
        )
        assert (rec.tree_sha256, rec.tree_leaf_size) == ("ab" * 32, 4 << 20)
        Catalog.open(url).close()  # nothing left to add: a no-op
    finally:
        again.close()
