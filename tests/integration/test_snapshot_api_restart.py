"""The compute API dies mid-snapshot and comes back (issue 17), on a real fleet (image
service, ``serve api`` on SQLite, one ``serve node --driver none``).

The process that accepted ``createImage`` is killed (SIGKILL) before its watcher's
first look at the node's job, leaving the server's ``task_state`` set. A new API process
on the same database takes the snapshot over once the dead watcher's lease runs out:
the task is cleared, and the image is ``active`` when the node finished the job, or
deleted when the node never got it. The server stays ACTIVE and can be snapshotted again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfleet.api import snapshots
from tests.conftest import wait_until as wait
from tests.integration.test_snapshot_faults import OneNode

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[OneNode]:
    f = OneNode(tmp_path, tmp_path / "images")
    yield f
    f.close()


def _task_in_db(fleet: OneNode, sid: str) -> str | None:
    (db,) = (fleet.api.root / "data").glob("*.sqlite")
    with sqlite3.connect(db) as conn:
        cur = conn.execute("SELECT task_state FROM compute_servers WHERE id = ?", (sid,))
        (task,) = cur.fetchone()
    return None if task is None else str(task)


def test_a_restarted_api_finishes_a_snapshot_its_predecessor_left(fleet: OneNode) -> None:
    sid = fleet.server("vm")["id"]
    resp = fleet.snapshot(sid, "snap-1")
    assert resp.status_code == 202, resp.text
    image_id = resp.json()["image_id"]
    assert fleet.api.proc is not None
    fleet.api.proc.kill()  # before its watcher's first look at the job (POLL after the ask)
    fleet.api.proc.wait()
    killed_at = time.monotonic()
    assert _task_in_db(fleet, sid) in (snapshots.SNAPSHOTTING, snapshots.UPLOADING)

    fleet.api.start()
    wait(lambda: fleet.show(sid)["OS-EXT-STS:task_state"] is None, timeout=snapshots.LEASE + 30)
    assert time.monotonic() - killed_at < snapshots.LEASE + 30
    job = fleet.agent.request("GET", f"/v1/servers/{sid}/snapshot")
    if job.status_code == 200 and job.json().get("image_id") == image_id:
        assert job.json()["state"] == "done", job.text
        assert fleet.image_status(image_id) == "active"
    else:  # killed before it asked the node: the queued image is deleted
        assert fleet.image_status(image_id) == 404
    assert fleet.show(sid)["status"] == "ACTIVE"
    assert "taking it over" in fleet.api.log_path.read_text()

    again = fleet.snapshot(sid, "snap-2")  # nothing is left holding the server
    assert again.status_code == 202, again.text
    wait(lambda: fleet.image_status(again.json()["image_id"]) == "active", timeout=60)
    wait(lambda: fleet.show(sid)["OS-EXT-STS:task_state"] is None, timeout=30)
