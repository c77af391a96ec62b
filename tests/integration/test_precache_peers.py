"""Pre-cache with peers on: image service (behind a counting, throttled proxy), compute
API, four node agents (driver none) on 127.0.0.2-5.

The API plans a tree of sources (``api_peer_fanout`` 2, the origin feeds one node) and
every node streams from a peer still downloading. Checked here, with real processes:
the origin's link carries about one image; every node ends ``cached`` with a base whose
bytes match the image; the progress resource names a peer as the source while bytes
flow and as the source that sent the most at the end; each node's metrics count the
bytes under the source that sent them; peer traffic without a node token is refused.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.fleet import FleetBase
from tests.fixtures.images import ImageService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ADMIN_TOKEN = "admin-token-" + "q" * 16
MIB = 1 << 20
SIZE = 24 * MIB  # 6 leaves of 4 MiB: ~3 s through the capped origin
RATE = 8e6  # bytes/s at the origin: slow enough that the peers stream from a download
HOSTS = tuple((f"node-{c}", f"127.0.0.{i + 2}") for i, c in enumerate("abcd"))


class Fleet(FleetBase):
    def __init__(self, root: Path, factory: Callable[..., ImageService]) -> None:
        super().__init__(root, factory, ADMIN_TOKEN)
        self.data = random.Random(16).randbytes(SIZE)
        self.image_id = self.images.upload("peers", self.data, visibility="public")
        self.start_proxy(rate=RATE)
        self.start_api(
            {
                "COWFLEET_API_HEARTBEAT_INTERVAL": "0.5",
                "COWFLEET_API_NODE_DOWN_AFTER": "10",
                "COWFLEET_API_PEER_FANOUT": "2",
            }
        )
        self.start_agents(HOSTS, image_url=self.proxy.url)
        self.wait_hypervisors(len(HOSTS))


@pytest.fixture
def fleet(tmp_path: Path, image_service_factory: Callable[..., ImageService]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, image_service_factory)
    yield f
    f.close()


def _metric(text: str, name: str, source: str) -> float:
    m = re.search(rf'^{name}\{{source="{source}"\}} (\S+)$', text, re.M)
    assert m is not None, f"no {name} for {source}"
    return float(m.group(1))


def test_precache_with_peers_sends_the_image_about_once_and_shows_peer_sources(
    fleet: Fleet,
) -> None:
    hosts = {name for name, _ in HOSTS}
    r = fleet.call("POST", "/cowfleet/precache", json={"image_id": fleet.image_id, "all": True})
    assert r.status_code == 202, r.text
    pid = r.json()["precache"]["id"]

    seen: dict[str, set[str]] = {h: set() for h in hosts}  # sources while bytes flowed
    deadline = time.monotonic() + 150
    while True:
        doc = fleet.call("GET", f"/cowfleet/precache/{pid}").json()["precache"]
        for n in doc["nodes"]:
            if n["state"] in ("fetching", "verifying") and n["source"]:
                seen[n["host"]].add(n["source"])
        if doc["state"] != "running":
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)

    nodes = {n["host"]: n for n in doc["nodes"]}
    assert doc["state"] == "done", doc
    assert set(nodes) == hosts
    for n in nodes.values():
        assert (n["state"], n["error"]) == ("cached", None), n
        assert n["bytes_done"] == n["bytes_total"] == SIZE
        assert n["source"] == "origin" or n["source"] in hosts - {n["host"]}, n
    # The origin's link carried about one image (a node that fell back would add one).
    sent = fleet.proxy.bytes_sent(fleet.image_id)
    assert SIZE <= sent <= 1.5 * SIZE, (sent / SIZE, fleet.proxy.ranges)
    # Peers did the rest: seen while bytes flowed, and as the final word.
    peer_live = {h: s - {"origin"} for h, s in seen.items()}
    assert any(peer_live.values()), seen
    for host, srcs in peer_live.items():
        assert srcs <= hosts - {host}, (host, srcs)  # peer names are other nodes
    assert sum(1 for n in nodes.values() if n["source"] != "origin") >= len(HOSTS) - 1, nodes

    # Every base is the image, byte for byte (its digest was checked by the node too).
    want = hashlib.sha256(fleet.data).hexdigest()
    for agent in fleet.agents:
        (base,) = [p for p in (agent.instances / "_base").iterdir() if p.is_file()]
        assert hashlib.sha256(base.read_bytes()).hexdigest() == want, agent.hostname

    # Metrics label bytes by who sent them: over the fleet, origin bytes ~ one image.
    origin = peer = 0.0
    for agent in fleet.agents:
        text = agent.request("GET", "/metrics").text
        origin += _metric(text, "cowfleet_fetch_bytes_total", "origin")
        peer += _metric(text, "cowfleet_fetch_bytes_total", "peer")
    assert origin + peer == len(HOSTS) * SIZE
    assert origin <= 1.5 * SIZE and peer >= (len(HOSTS) - 1.5) * SIZE, (origin, peer)

    # Peer traffic needs a node token.
    url = f"{fleet.agents[0].url}/peer/v1/images/{fleet.image_id}"
    assert httpx.get(url, timeout=10).status_code == 401
    assert (
        httpx.get(url, headers={"X-Auth-Token": "not-a-node-token"}, timeout=10).status_code == 401
    )
    ok = fleet.agents[0].request(
        "GET", f"/peer/v1/images/{fleet.image_id}", headers={"Range": "bytes=0-9"}
    )
    assert ok.status_code == 206 and ok.content == fleet.data[:10]
