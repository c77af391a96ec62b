"""The scheduler's snapshot counts a claim at once: the image it brings shows on its node
before the build is dispatched, so concurrent placements of one image follow it there."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update

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
