"""A snapshot whose API process died is finished by the sweep (issue 17).

The server's row keeps the image and the watcher's lease; once the lease runs out,
:func:`cowfleet.api.snapshots.recover` takes the snapshot over (one winner across
replicas), follows the node's job and finishes it. Fake image service and nodes.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from cowfleet.api import snapshots
from cowfleet.api.app import create_app
from cowfleet.api.db.models import ServerRow
from cowfleet.api.fleet import Fleet
from cowfleet.api.settings import ApiSettings
from tests.unit._api_fakes import (
    ADMIN,
    MEMBER_A,
    TOKENS,
    Clock,
    FakeNodes,
    create,
    register,
    status_of,
    wait_for,
)
from tests.unit.test_api_snapshot import SnapImages


class JobNodes(FakeNodes):
    """Each server's snapshot job as the test sets it (absent: the node has none)."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.looks = 0

    def snapshot(self, node_url: str, uuid: str, image_id: str, token: str) -> dict[str, Any]:
        job = {"uuid": uuid, "image_id": image_id, "state": "running"}
        self.jobs[uuid] = job
        return job

    def snapshot_status(self, node_url: str, uuid: str) -> dict[str, Any] | None:
        self.looks += 1
        return self.jobs.get(uuid)


class StatusImages(SnapImages):
    """Images ``queued`` unless the test says otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, str] = {}

    def doc(self, image_id: str, token: str) -> dict[str, Any] | None:
        return {
            **(super().doc(image_id, token) or {}),
            "status": self.status.get(image_id, "queued"),
        }


Env = tuple[TestClient, Fleet, StatusImages, JobNodes, Clock]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(snapshots, "POLL", 0.01)
    images, nodes, clock = StatusImages(), JobNodes(), Clock()
    cfg = ApiSettings(
        database_url=f"sqlite:///{tmp_path / 'compute.sqlite'}",
        tokens_file=tmp_path / "tokens.toml",
        image_url="http://127.0.0.1:9",
    )
    app = create_app(cfg, TOKENS, sweep=False, images=images, nodes=nodes, clock=clock)
    with TestClient(app) as client:
        register(client, "node-1")
        yield client, app.state.fleet, images, nodes, clock


def _orphan(
    env: Env, task: str = snapshots.UPLOADING, lease: float | None = None
) -> tuple[str, str]:
    """A server mid-snapshot as a dead API process left it: the task, the image, the lease."""
    client, fleet, _, _, _ = env
    sid = str(create(client, "vm", MEMBER_A).json()["server"]["id"])
    wait_for(lambda: status_of(client, sid, MEMBER_A) == "ACTIVE")
    image_id = str(uuidlib.uuid4())
    with fleet.db.write() as s:
        s.execute(
            update(ServerRow)
            .where(ServerRow.id == sid)
            .values(task_state=task, snapshot_image_id=image_id, task_lease=lease)
        )
    return sid, image_id


def _row(fleet: Fleet, sid: str) -> ServerRow:
    with fleet.db.read() as s:
        row = s.scalars(select(ServerRow).where(ServerRow.id == sid)).one()
        s.expunge(row)
        return row


def _cleared(fleet: Fleet, sid: str) -> bool:
    row = _row(fleet, sid)
    return row.task_state is None and row.snapshot_image_id is None and row.task_lease is None


def test_a_finished_job_clears_the_task_and_keeps_the_image(env: Env) -> None:
    _, fleet, images, nodes, _ = env
    sid, image_id = _orphan(env)
    nodes.jobs[sid] = {"uuid": sid, "image_id": image_id, "state": "done"}
    assert snapshots.recover(fleet, ADMIN) == [sid]
    wait_for(lambda: _cleared(fleet, sid))
    assert images.deleted == []
    assert nodes.looks >= 1


@pytest.mark.parametrize("job", ["failed", "none", "another-image"])
def test_a_failed_or_missing_job_deletes_the_image_and_clears_the_task(env: Env, job: str) -> None:
    _, fleet, images, nodes, _ = env
    sid, image_id = _orphan(env, task=snapshots.SNAPSHOTTING)
    if job == "failed":
        nodes.jobs[sid] = {"uuid": sid, "image_id": image_id, "state": "failed", "fault": "x"}
    elif job == "another-image":
        nodes.jobs[sid] = {"uuid": sid, "image_id": str(uuidlib.uuid4()), "state": "running"}
    assert snapshots.recover(fleet, ADMIN) == [sid]
    wait_for(lambda: _cleared(fleet, sid))
    assert images.deleted == [image_id]


def test_a_node_that_forgot_a_finished_job_keeps_the_active_image(env: Env) -> None:
    _, fleet, images, _, _ = env
    sid, image_id = _orphan(env)
    images.status[image_id] = "active"  # uploaded, then the node restarted
    assert snapshots.recover(fleet, ADMIN) == [sid]
    wait_for(lambda: _cleared(fleet, sid))
    assert images.deleted == []


def test_a_running_job_is_followed_until_it_ends(env: Env) -> None:
    _, fleet, images, nodes, _ = env
    sid, image_id = _orphan(env)
    nodes.jobs[sid] = {"uuid": sid, "image_id": image_id, "state": "running"}
    assert snapshots.recover(fleet, ADMIN) == [sid]
    wait_for(lambda: nodes.looks >= 3)
    assert _row(fleet, sid).task_state == snapshots.UPLOADING
    assert snapshots.recover(fleet, ADMIN) == []  # followed here: not taken twice
    nodes.jobs[sid] = {"uuid": sid, "image_id": image_id, "state": "done"}
    wait_for(lambda: _cleared(fleet, sid))
    assert images.deleted == []


def test_a_live_lease_is_left_alone_until_it_runs_out(env: Env) -> None:
    _, fleet, images, nodes, clock = env
    sid, image_id = _orphan(env, lease=clock.now + 10)
    nodes.jobs[sid] = {"uuid": sid, "image_id": image_id, "state": "failed"}
    assert snapshots.recover(fleet, ADMIN) == []
    assert _row(fleet, sid).task_state == snapshots.UPLOADING
    clock.now += 11
    assert snapshots.recover(fleet, ADMIN) == [sid]
    wait_for(lambda: _cleared(fleet, sid))
    assert images.deleted == [image_id]


def test_one_replica_wins_the_takeover(env: Env) -> None:
    _, fleet, _, _, clock = env
    sid, _ = _orphan(env, lease=clock.now - 1)
    # Two replicas' sweeps saw the same expired lease; the conditional UPDATE picks one.
    first = snapshots.Lease(fleet, sid, clock.now - 1)
    second = snapshots.Lease(fleet, sid, clock.now - 1)
    assert first.take() is True
    assert second.take() is False
    assert second.renew(force=True) is False  # and it can never renew what it lost
    assert first.renew(force=True) is True


def test_the_generic_stuck_task_sweep_leaves_a_snapshot_to_its_lease(env: Env) -> None:
    _, fleet, images, _, clock = env
    sid, _ = _orphan(env, lease=clock.now + 3600)
    clock.now += 1000  # far past the stuck-task grace, lease still held
    with fleet.db.write() as s:
        s.execute(update(ServerRow).where(ServerRow.id == sid).values(updated_at=0.0))
    fleet.sweep()
    assert _row(fleet, sid).task_state == snapshots.UPLOADING
    assert images.deleted == []


def test_a_normal_snapshot_records_its_image_and_lease_then_clears_them(env: Env) -> None:
    client, fleet, images, nodes, clock = env
    sid = str(create(client, "vm", MEMBER_A).json()["server"]["id"])
    wait_for(lambda: status_of(client, sid, MEMBER_A) == "ACTIVE")
    resp = client.post(
        f"/v2.1/servers/{sid}/action",
        json={"createImage": {"name": "s"}},
        headers={"X-Auth-Token": MEMBER_A, "OpenStack-API-Version": "compute 2.45"},
    )
    assert resp.status_code == 202
    image_id = resp.json()["image_id"]
    row = _row(fleet, sid)
    assert row.snapshot_image_id == image_id
    assert row.task_lease is not None and row.task_lease > clock.now
    wait_for(lambda: sid in nodes.jobs)  # the node was asked
    assert snapshots.recover(fleet, ADMIN) == []  # its watcher is alive
    nodes.jobs[sid] = {"uuid": sid, "image_id": image_id, "state": "done"}
    wait_for(lambda: _cleared(fleet, sid))
    assert images.deleted == []
