"""Fixes found by the fleet benchmarks (bench/fleet_boot.py, bench/no_overcommit.py).

The scheduler's snapshot counts a claim at once: the image it brings shows on its node
before the build is dispatched, so concurrent placements of one image follow it there.
SQLite writers of one API process queue on a lock instead of SQLite's busy handler."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import event, update

from cowfleet.api.db.engine import Database
from cowfleet.api.db.models import ServerRow
from cowfleet.api.fleet import Fleet
from cowfleet.api.settings import ApiSettings
from cowfleet.scheduler.claims import need_of, try_claim
from cowfleet.scheduler.model import Ratios, Request
from cowfleet.scheduler.select import select as select_hosts
from tests.unit._api_fakes import FakeImages, FakeNodes
from tests.unit.test_api_claims import TINY, add_node, add_servers


def test_a_claimed_but_undispatched_server_brings_its_image_to_the_snapshot(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'compute.sqlite'}"
    db = Database.open(url)
    fleet = Fleet(
        db,
        ApiSettings(url, tmp_path / "tokens", "http://x"),
        FakeImages(),
        FakeNodes(),
        clock=lambda: 0.0,
    )
    try:
        for host in ("node-a", "node-b"):
            add_node(db, host, vcpus=8, ram_mb=8192, disk_gb=100)
        first, _second = add_servers(db, 2)
        with db.write() as s:
            s.execute(update(ServerRow).values(image_id="img-1"))
        # The first server holds a claim on node-b; its build is not dispatched (no host).
        assert try_claim(db, first, "node-b", need_of(TINY), Ratios())
        with db.read() as s:
            snapshot = {h.hostname: h for h in fleet.host_states(s)}
        assert snapshot["node-b"].images == frozenset({"img-1"})
        assert snapshot["node-a"].images == frozenset()
        # The second server of the image follows it, although node-b has less RAM free.
        sel = select_hosts(Request(need_of(TINY), "img-1"), list(snapshot.values()))
        assert sel.candidates[0].hostname == "node-b"
    finally:
        fleet.close()
        db.close()


def test_sqlite_writers_of_one_process_queue_on_a_lock_not_in_the_busy_handler(
    tmp_path: Path,
) -> None:
    """A second writer waits for the first before it begins its transaction (no BEGIN
    IMMEDIATE spinning in SQLite's busy handler, which sleeps up to 100 ms per try)."""
    db = Database.open(f"sqlite:///{tmp_path / 'compute.sqlite'}")
    with db.engine.connect(), db.engine.connect():
        pass  # two pooled connections, their pragmas run: the writers below only BEGIN
    begins: list[str] = []
    event.listen(
        db.engine,
        "before_cursor_execute",
        lambda _c, _cur, stmt, *_a: (
            begins.append(threading.current_thread().name) if stmt.startswith("BEGIN") else None
        ),
    )
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with db.write() as s:
            s.execute(update(ServerRow).values(name="y"))  # holds SQLite's write lock
            holding.set()
            release.wait(10)

    def second() -> None:
        with db.write() as s:
            s.execute(update(ServerRow).values(name="x"))

    a = threading.Thread(target=first, name="first")
    b = threading.Thread(target=second, name="second")
    try:
        a.start()
        assert holding.wait(10)
        b.start()
        time.sleep(0.3)
        assert begins == ["first"]  # the second has not sent its BEGIN IMMEDIATE yet
        release.set()
        a.join(10)
        b.join(10)
        assert begins == ["first", "second"]
    finally:
        release.set()
        db.close()
