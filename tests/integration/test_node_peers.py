"""Nodes fetch from each other: real ``cowfleet serve node`` agents on loopback
(127.0.0.2-4), the real image service behind a counting (and, for one test, throttling)
proxy, a fake controller that records peer reports, and a rogue peer written here
(:mod:`tests.integration._rogue_peer`).
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import Layout
from cowfleet.hashtree import DEFAULT_LEAF_SIZE
from tests.fixtures.images import ImageService, start_image_service
from tests.fixtures.node_agent import AGENT_MEMBER_TOKEN as MEMBER_TOKEN
from tests.fixtures.node_agent import AGENT_NODE_TOKEN as NODE_TOKEN
from tests.fixtures.node_agent import AGENT_TOKENS as TOKENS
from tests.fixtures.node_agent import CountingProxy, FakeController, NodeAgent
from tests.fixtures.node_agent import private_file as _private
from tests.integration._rogue_peer import RoguePeer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MIB = 1024 * 1024
LEAF = DEFAULT_LEAF_SIZE
TINY = {"name": "t1.tiny", "vcpus": 1, "ram_mb": 256, "root_gb": 1, "ephemeral_gb": 0, "swap_mb": 0}


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Fleet:
    service: ImageService
    proxy: CountingProxy
    controller: FakeController
    agents: dict[str, NodeAgent]

    def upload(self, size: int, seed: int) -> tuple[str, bytes]:
        data = _data(size, seed)
        return self.service.upload(f"peer-{seed}", data), data

    def build(
        self,
        name: str,
        image_id: str,
        sources: list[dict[str, str]] | None = None,
        stripes: list[list[dict[str, str]]] | None = None,
    ) -> str:
        uuid = str(uuid_mod.uuid4())
        spec: dict[str, Any] = {
            "uuid": uuid,
            "name": "vm",
            "project_id": "demo",
            "image_id": image_id,
            "flavor": TINY,
        }
        if sources is not None:
            spec["sources"] = sources
        if stripes is not None:
            spec["stripes"] = stripes
        resp = self.agents[name].request("PUT", f"/v1/servers/{uuid}", json=spec)
        assert resp.status_code == 202, resp.text
        return uuid

    def source(self, name: str) -> dict[str, str]:
        return {"host": name, "url": self.agents[name].url}

    def base(self, name: str, image_id: str) -> bytes:
        return Layout(self.agents[name].instances).paths(image_id).base.read_bytes()

    def peer_reports(self) -> list[dict[str, Any]]:
        with self.controller.lock:
            return [e for e in self.controller.events if "peer" in e]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("peers")
    svc = start_image_service(root / "images", tokens_file=_private(root / "tokens.toml", TOKENS))
    svc.token = MEMBER_TOKEN
    proxy = CountingProxy(svc.url)
    controller = FakeController(NODE_TOKEN)
    token_file = _private(root / "node-token", NODE_TOKEN + "\n")
    agents = {
        name: NodeAgent(
            root / name,
            api_url=controller.url,
            image_url=proxy.url,
            token_file=token_file,
            host=f"127.0.0.{i}",
            hostname=name,
            extra_env={"COWFLEET_NODE_PEER_STALL_TIMEOUT": "2"},
        )
        for i, name in ((2, "node-a"), (3, "node-b"), (4, "node-c"))
    }
    try:
        for agent in agents.values():
            agent.start()
        yield Fleet(svc, proxy, controller, agents)
    finally:
        for agent in agents.values():
            agent.stop()
        controller.close()
        proxy.close()
        svc.stop()


def test_b_fetches_from_a_and_the_origin_sends_the_image_once(fleet: Fleet) -> None:
    iid, data = fleet.upload(3 * LEAF + 12345, 1)
    fleet.agents["node-a"].wait_state(fleet.build("node-a", iid), "ACTIVE")
    assert fleet.proxy.count(iid) == 1
    fleet.agents["node-b"].wait_state(
        fleet.build("node-b", iid, [fleet.source("node-a")]), "ACTIVE"
    )
    assert fleet.proxy.count(iid) == 1  # node-b's bytes all came from node-a
    assert fleet.base("node-b", iid) == data
    # the whole-image digest still ran over node-b's own stream, beside the tree
    log = fleet.agents["node-b"].log_path.read_text()
    assert f"image {iid}: cached" in log and "verified with sha256 tree + sha512" in log


def test_peer_route_ranges_tokens_and_what_is_never_served(fleet: Fleet) -> None:
    a = fleet.agents["node-a"]
    iid, data = fleet.upload(LEAF + 999, 2)
    a.wait_state(fleet.build("node-a", iid), "ACTIVE")
    path = f"/peer/v1/images/{iid}"
    size = len(data)

    full = a.request("GET", path)
    assert full.status_code == 200 and full.content == data
    assert full.headers["accept-ranges"] == "bytes"
    part = a.request("GET", path, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"
    tail = a.request("GET", path, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    past = a.request("GET", path, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    head = a.request("HEAD", path)
    assert head.status_code == 200 and head.headers["content-length"] == str(size)
    assert head.content == b""

    for token in ("", "wrong-token", MEMBER_TOKEN):
        assert a.request("GET", path, token=token).status_code == 401
    assert a.request("GET", f"/peer/v1/images/{uuid_mod.uuid4()}").status_code == 404
    assert a.request("GET", "/peer/v1/images/not-a-uuid").status_code == 400
    for probe in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "_base"):
        assert a.request("GET", f"/peer/v1/images/{probe}").status_code in (400, 404)

    # a base whose record says it failed verification is never served
    paths = Layout(a.instances).paths(iid)
    meta = md.read_meta(paths.meta)
    assert meta is not None
    md.write_meta(paths.meta, meta.marked(md.STATE_FAILED, "test: bad sha512", time.time()))
    assert a.request("GET", path).status_code == 404
    assert a.request("HEAD", path).status_code == 404


def test_a_rogue_peer_is_caught_by_the_tree_flagged_and_the_origin_finishes(
    fleet: Fleet,
) -> None:
    iid, data = fleet.upload(5 * LEAF + 4321, 3)
    rogue = RoguePeer(NODE_TOKEN, {iid: data}, corrupt=2 * LEAF + 5)
    try:
        uuid = fleet.build("node-c", iid, [{"host": "rogue", "url": rogue.url}])
        fleet.agents["node-c"].wait_state(uuid, "ACTIVE")
    finally:
        rogue.close()
    assert fleet.base("node-c", iid) == data
    # the leaves before the bad one were kept: the origin sent only the rest
    assert fleet.proxy.ranges[iid] == [f"bytes={2 * LEAF}-"]
    reports = [r for r in fleet.peer_reports() if r["image_id"] == iid]
    assert [r["peer"] for r in reports] == ["rogue"]
    assert "leaf 2" in reports[0]["reason"]


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_a_peer_lost_mid_transfer_is_resumed_from_the_origin_at_the_same_offset(
    fleet: Fleet, how: str
) -> None:
    seed = 4 if how == "killed" else 5
    iid, data = fleet.upload(5 * LEAF + 77, seed)
    cut = 3 * LEAF + 1000
    kw = {"die_at": cut} if how == "killed" else {"stall_at": cut}
    peer = RoguePeer(NODE_TOKEN, {iid: data}, **kw)  # type: ignore[arg-type]
    try:
        uuid = fleet.build("node-b", iid, [{"host": "flaky", "url": peer.url}])
        fleet.agents["node-b"].wait_state(uuid, "ACTIVE")
    finally:
        peer.close()
    assert fleet.base("node-b", iid) == data
    assert peer.ranges == [None]
    # resumed at the last verified byte (the start of the leaf the peer broke off in)
    assert fleet.proxy.ranges[iid] == [f"bytes={3 * LEAF}-"]
    assert not [r for r in fleet.peer_reports() if r["image_id"] == iid]  # not a bad piece


def test_streaming_through_from_a_peer_still_downloading(fleet: Fleet) -> None:
    iid, data = fleet.upload(6 * LEAF, 6)
    a, b = fleet.agents["node-a"], fleet.agents["node-b"]
    fleet.proxy.rate = 8 * MIB  # node-a's download from the origin takes about 3 s
    try:
        ua = fleet.build("node-a", iid)
        deadline = time.monotonic() + 30
        while fleet.proxy.count(iid) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        ub = fleet.build("node-b", iid, [fleet.source("node-a")])
        assert a.request("GET", f"/v1/servers/{ua}").json()["state"] == "BUILDING"
        b.wait_state(ub, "ACTIVE")
        a.wait_state(ua, "ACTIVE")
    finally:
        fleet.proxy.rate = None
    assert fleet.proxy.count(iid) == 1  # node-b took every byte from node-a's download
    assert hashlib.sha256(fleet.base("node-b", iid)).digest() == hashlib.sha256(data).digest()


def test_sources_in_a_build_spec_are_checked(fleet: Fleet) -> None:
    iid, _ = fleet.upload(1000, 7)
    spec = {
        "uuid": str(uuid_mod.uuid4()),
        "name": "vm",
        "image_id": iid,
        "flavor": TINY,
        "sources": [{"host": "x", "url": "file:///etc/passwd"}],
    }
    resp = fleet.agents["node-c"].request("PUT", f"/v1/servers/{spec['uuid']}", json=spec)
    assert resp.status_code == 400 and "source url" in resp.json()["error"]["message"]
    with pytest.raises(httpx.HTTPError):  # nothing listens there: the test's own check
        httpx.get("http://127.0.0.1:1/", timeout=1)


def test_a_chain_of_three_started_at_once_takes_one_copy_from_the_origin(fleet: Fleet) -> None:
    iid, data = fleet.upload(3 * LEAF, 8)
    fleet.proxy.rate = 16 * MIB
    try:
        ua = fleet.build("node-a", iid)  # no wait: node-b asks before node-a has started
        ub = fleet.build("node-b", iid, [fleet.source("node-a")])
        uc = fleet.build("node-c", iid, [fleet.source("node-b"), fleet.source("node-a")])
        for name, uuid in (("node-a", ua), ("node-b", ub), ("node-c", uc)):
            fleet.agents[name].wait_state(uuid, "ACTIVE")
    finally:
        fleet.proxy.rate = None
    assert fleet.proxy.count(iid) == 1  # one copy from the origin fed a chain of three
    assert fleet.base("node-c", iid) == data


def test_a_striped_fetch_of_three_takes_one_copy_from_the_origin(fleet: Fleet) -> None:
    """node-a fetches from the origin; node-b takes both stripes from node-a's download
    in progress, node-c stripe 0 from node-a and stripe 1 from node-b (also in progress)."""
    iid, data = fleet.upload(6 * LEAF + 999, 21)
    a, b = fleet.source("node-a"), fleet.source("node-b")
    fleet.proxy.rate = 16 * MIB
    try:
        ua = fleet.build("node-a", iid)
        ub = fleet.build("node-b", iid, [a], stripes=[[a], [a]])
        uc = fleet.build("node-c", iid, [a], stripes=[[a], [b, a]])
        for name, uuid in (("node-a", ua), ("node-b", ub), ("node-c", uc)):
            fleet.agents[name].wait_state(uuid, "ACTIVE")
    finally:
        fleet.proxy.rate = None
    assert fleet.proxy.count(iid) == 1 and fleet.proxy.bytes_sent(iid) == len(data)
    for name in ("node-a", "node-b", "node-c"):
        assert fleet.base(name, iid) == data
    log = fleet.agents["node-c"].log_path.read_text()
    assert f"image {iid}: cached" in log and "verified with sha256 tree + sha512" in log


@pytest.mark.parametrize("how", ["lying", "killed"])
def test_a_striped_fetch_survives_a_stripe_source_that_lies_or_dies(fleet: Fleet, how: str) -> None:
    seed = 22 if how == "lying" else 23
    iid, data = fleet.upload(6 * LEAF + 5, seed)
    fleet.agents["node-a"].wait_state(fleet.build("node-a", iid), "ACTIVE")
    kw = {"corrupt": 3 * LEAF + 9} if how == "lying" else {"die_at": LEAF + 100}
    rogue = RoguePeer(NODE_TOKEN, {iid: data}, **kw)  # type: ignore[arg-type]
    a, bad = fleet.source("node-a"), {"host": "rogue", "url": rogue.url}
    try:
        # stripe 1 (leaves 1, 3, 5) from the rogue first, then node-a
        uuid = fleet.build("node-b", iid, [a], stripes=[[a], [bad, a]])
        fleet.agents["node-b"].wait_state(uuid, "ACTIVE")
    finally:
        rogue.close()
    assert fleet.base("node-b", iid) == data
    assert fleet.proxy.count(iid) == 1  # node-a's own fetch only
    assert rogue.ranges == [f"bytes={LEAF}-"]
    reports = [r for r in fleet.peer_reports() if r["image_id"] == iid]
    if how == "lying":
        assert [r["peer"] for r in reports] == ["rogue"] and "leaf 3" in reports[0]["reason"]
    else:
        assert not reports


def test_bad_stripes_in_a_build_spec_are_400(fleet: Fleet) -> None:
    iid, _ = fleet.upload(1000, 24)
    spec = {
        "uuid": str(uuid_mod.uuid4()),
        "name": "vm",
        "image_id": iid,
        "flavor": TINY,
        "stripes": [[{"host": "x", "url": "http://127.0.0.5:1"}]],
    }
    resp = fleet.agents["node-c"].request("PUT", f"/v1/servers/{spec['uuid']}", json=spec)
    assert resp.status_code == 400 and "stripes must be a list of 2 to 8" in resp.text


def test_a_stripe_fed_by_the_origin_takes_one_bounded_range_per_leaf(fleet: Fleet) -> None:
    iid, data = fleet.upload(4 * LEAF + 321, 25)  # 5 leaves: 0, 2, 4 in stripe 0
    fleet.agents["node-a"].wait_state(fleet.build("node-a", iid), "ACTIVE")
    a = fleet.source("node-a")
    uuid = fleet.build("node-b", iid, [a], stripes=[[], [a]])
    fleet.agents["node-b"].wait_state(uuid, "ACTIVE")
    assert fleet.base("node-b", iid) == data
    size = len(data)
    assert fleet.proxy.ranges[iid] == [
        None,  # node-a's whole fetch
        f"bytes=0-{LEAF - 1}",
        f"bytes={2 * LEAF}-{3 * LEAF - 1}",
        f"bytes={4 * LEAF}-{size - 1}",
    ]
    assert fleet.proxy.bytes_sent(iid) == size + 2 * LEAF + (size - 4 * LEAF)
