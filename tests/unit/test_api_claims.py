"""Claims in the database: concurrent claims never overcommit a node (SQLite here;
tests/integration/test_compute_claims.py runs the same race on PostgreSQL)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from cowfleet.api.db.engine import Database
from cowfleet.api.db.models import NodeRow, ServerRow
from cowfleet.scheduler.claims import need_of, release, try_claim
from cowfleet.scheduler.model import Ratios

TINY = {
    "id": "1",
    "original_name": "m1.tiny",
    "vcpus": 1,
    "ram": 512,
    "disk": 1,
    "ephemeral": 0,
    "swap": 0,
}


def add_node(db: Database, hostname: str, *, vcpus: int, ram_mb: int, disk_gb: int) -> None:
    with db.write() as s:
        s.add(
            NodeRow(
                id=str(uuid.uuid4()),
                hostname=hostname,
                url="http://127.0.0.2:1",
                hypervisor_type="none",
                vcpus=vcpus,
                ram_mb=ram_mb,
                disk_gb=disk_gb,
                disk_free_gb=disk_gb,
                vcpus_used=0,
                ram_used_mb=0,
                disk_used_gb=0,
                enabled=True,
                cache=[],
                instances=[],
                unknown=[],
                created_at=0.0,
                last_heartbeat=0.0,
            )
        )


def add_servers(db: Database, n: int, flavor: dict[str, object] = TINY) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with db.write() as s:
        for i in ids:
            s.add(
                ServerRow(
                    id=i,
                    name=i[:8],
                    project_id="p",
                    image_id=i,
                    image_props={},
                    flavor_id="1",
                    flavor=flavor,
                    vm_state="building",
                    task_state="scheduling",
                    power_state=0,
                    attempts=0,
                    tried_hosts=[],
                    deleted=False,
                    created_at=0.0,
                    updated_at=0.0,
                )
            )
    return ids


def race(db: Database, ids: list[str], host: str, ratios: Ratios) -> list[bool]:
    results: dict[str, bool] = {}
    start = threading.Barrier(len(ids))

    def claim_one(server_id: str) -> None:
        start.wait()
        results[server_id] = try_claim(db, server_id, host, need_of(TINY), ratios)

    threads = [threading.Thread(target=claim_one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in ids]


def check_race(db: Database) -> None:
    """100 concurrent claims of m1.tiny on a node with room for exactly 50."""
    add_node(db, "node-1", vcpus=50, ram_mb=50 * 512, disk_gb=1000)
    ids = add_servers(db, 100)
    won = race(db, ids, "node-1", Ratios(cpu=1.0, ram=1.0, disk=1.0))
    assert sum(won) == 50
    with db.read() as s:
        node = s.scalars(select(NodeRow)).one()
        assert (node.vcpus_used, node.ram_used_mb) == (50, 50 * 512)
        holders = s.scalars(select(ServerRow.id).where(ServerRow.claim_host == "node-1")).all()
    assert sorted(holders) == sorted(i for i, w in zip(ids, won, strict=True) if w)


def test_concurrent_claims_never_overcommit_sqlite(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path / 'c.sqlite'}")
    try:
        check_race(db)
    finally:
        db.close()


def test_a_claim_is_released_once_and_a_server_holds_one_claim(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path / 'c.sqlite'}")
    add_node(db, "a", vcpus=4, ram_mb=4096, disk_gb=10)
    add_node(db, "b", vcpus=4, ram_mb=4096, disk_gb=10)
    (sid,) = add_servers(db, 1)
    r = Ratios(1.0, 1.0, 1.0)
    assert try_claim(db, sid, "a", need_of(TINY), r)
    assert not try_claim(db, sid, "b", need_of(TINY), r)  # one claim per server
    with db.write() as s:
        assert release(s, sid) == "a"
    with db.write() as s:
        assert release(s, sid) is None  # twice: nothing more given back
    with db.read() as s:
        assert [n.ram_used_mb for n in s.scalars(select(NodeRow).order_by(NodeRow.hostname))] == [
            0,
            0,
        ]
    db.close()


@pytest.fixture(scope="module")
def claims_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = Database.open(f"sqlite:///{tmp_path_factory.mktemp('claims') / 'c.sqlite'}")
    yield db
    db.close()


ops = st.lists(
    st.tuples(st.sampled_from(["claim", "release"]), st.integers(0, 9), st.sampled_from("ab")),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(steps=ops, vcpus=st.integers(1, 4), flavor_cpus=st.integers(1, 3))
def test_any_sequence_of_claims_and_releases_keeps_usage_exact(
    claims_db: Database, steps: list[tuple[str, int, str]], vcpus: int, flavor_cpus: int
) -> None:
    db = claims_db
    with db.write() as s:
        s.execute(delete(ServerRow))
        s.execute(delete(NodeRow))
    add_node(db, "a", vcpus=vcpus, ram_mb=1 << 20, disk_gb=1 << 10)
    add_node(db, "b", vcpus=vcpus, ram_mb=1 << 20, disk_gb=1 << 10)
    flavor = {**TINY, "vcpus": flavor_cpus}
    ids = add_servers(db, 10, flavor)
    r = Ratios(1.0, 1.0, 1.0)
    for op, index, host in steps:
        if op == "claim":
            try_claim(db, ids[index], host, need_of(flavor), r)
        else:
            with db.write() as s:
                release(s, ids[index])
    with db.read() as s:
        for node in s.scalars(select(NodeRow)):
            held = s.scalars(select(ServerRow).where(ServerRow.claim_host == node.hostname)).all()
            assert node.vcpus_used == flavor_cpus * len(held)
            assert node.vcpus_used <= node.vcpus
