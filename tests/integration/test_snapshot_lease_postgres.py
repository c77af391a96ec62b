"""The snapshot watcher's lease on PostgreSQL: of several replicas' sweeps that saw the
same expired lease, exactly one takes the snapshot over (issue 17), and the lease's
value round-trips so that its holder can renew it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from cowfleet.api import snapshots
from cowfleet.api.db.engine import Database
from cowfleet.api.db.models import ServerRow
from cowfleet.api.fleet import Fleet
from tests.fixtures.compute_api import pg_schema

pytestmark = pytest.mark.integration

NOW = 1_800_000_000.123456
SID = "7a3c9f0e-1b2d-4e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_schema() as url:
        yield url


def _replica(db: Database) -> Fleet:
    return cast(Fleet, SimpleNamespace(db=db, clock=lambda: NOW))


def _orphan(db: Database, lease: float) -> None:
    with db.write() as s:
        s.add(
            ServerRow(
                id=SID, name="vm", project_id="p", image_id="i", flavor_id="1", flavor={},
                vm_state="active", task_state=snapshots.UPLOADING, host="node-a",
                created_at=NOW, updated_at=NOW, snapshot_image_id="img", task_lease=lease,
            )
        )  # fmt: skip


def test_one_of_many_replicas_takes_an_expired_lease(pg_url: str) -> None:
    dbs = [Database.open(pg_url) for _ in range(6)]
    try:
        _orphan(dbs[0], NOW - 5.5)
        barrier = threading.Barrier(len(dbs))
        won: list[Any] = []

        def sweep(db: Database) -> None:
            lease = snapshots.Lease(_replica(db), SID, NOW - 5.5)
            barrier.wait()
            if lease.take():
                won.append(lease)

        threads = [threading.Thread(target=sweep, args=(db,)) for db in dbs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        (winner,) = won
        assert winner.value == NOW + snapshots.LEASE
        assert winner.renew(force=True)  # the value read back equals the one written
        assert not snapshots.Lease(_replica(dbs[1]), SID, NOW - 5.5).take()
    finally:
        for db in dbs:
            db.close()
