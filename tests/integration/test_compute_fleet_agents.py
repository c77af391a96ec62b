"""The whole fleet on loopback: image service, compute API, two real node agents.

``cowfleet serve images --tokens-file``, ``cowfleet serve api`` and two
``cowfleet serve node --driver none`` on 127.0.0.2 and 127.0.0.3 (each with its own
instances path), driven by the unmodified ``openstack`` client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until as wait
from tests.fixtures.fleet import FleetBase
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "f" * 16
RAW = b"\0" * (2 << 20)


class Fleet(FleetBase):
    def __init__(self, root: Path, factory: Callable[..., ImageService]) -> None:
        super().__init__(root, factory, ADMIN_TOKEN)
        self.image_id = self.images.upload("cirros", RAW, visibility="public")
        self.start_api(
            {
                "COWFLEET_API_HEARTBEAT_INTERVAL": "1",
                "COWFLEET_API_NODE_DOWN_AFTER": "4",
                "COWFLEET_API_CPU_ALLOCATION_RATIO": "1.0",  # 4 m1.tiny per agent
            }
        )
        self.start_agents()
        self.start_cloud("fleet")


@pytest.fixture
def fleet(tmp_path: Path, image_service_factory: Callable[..., ImageService]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, image_service_factory)
    yield f
    f.close()


def test_openstack_boots_through_the_api_onto_real_node_agents(fleet: Fleet) -> None:
    wait(lambda: len(fleet.osc("hypervisor", "list", "-f", "json")) == 2)
    vm1 = fleet.osc(
        "server",
        "create",
        "--image",
        "cirros",
        "--flavor",
        "m1.tiny",
        "--nic",
        "none",
        "--wait",
        "vm1",
        "-f",
        "json",
    )
    assert vm1["status"] == "ACTIVE"
    host = vm1["OS-EXT-SRV-ATTR:host"]
    agent = next(a for a in fleet.agents if a.hostname == host)
    assert agent.request("GET", f"/v1/servers/{vm1['id']}").json()["state"] == "ACTIVE"
    # The image is on that node now: the next server of it follows the cache.
    vm2 = fleet.osc(
        "server",
        "create",
        "--image",
        "cirros",
        "--flavor",
        "m1.tiny",
        "--nic",
        "none",
        "--wait",
        "vm2",
        "-f",
        "json",
    )
    assert vm2["OS-EXT-SRV-ATTR:host"] == host
    rows = fleet.osc("server", "list", "--long", "-f", "json")
    assert sorted((r["Name"], r["Status"], r["Host"]) for r in rows) == [
        ("vm1", "ACTIVE", host),
        ("vm2", "ACTIVE", host),
    ]
    fleet.osc("server", "stop", "vm1")
    wait(lambda: fleet.osc("server", "show", "vm1", "-f", "json")["status"] == "SHUTOFF")
    assert agent.request("GET", f"/v1/servers/{vm1['id']}").json()["state"] == "SHUTOFF"
    fleet.osc("server", "start", "vm1")
    wait(lambda: fleet.osc("server", "show", "vm1", "-f", "json")["status"] == "ACTIVE")
    fleet.osc("server", "reboot", "--wait", "vm1")
    fleet.osc("server", "delete", "--wait", "vm1", "vm2")
    assert fleet.osc("server", "list", "-f", "json") == []
    wait(lambda: agent.request("GET", "/v1/servers").json()["servers"] == [])
    hv = fleet.osc("hypervisor", "show", host, "-f", "json")
    assert hv["memory_mb_used"] == 0 and hv["vcpus_used"] == 0


def _api(fleet: Fleet, method: str, path: str, **kw: Any) -> httpx.Response:
    hdrs = {"X-Auth-Token": ADMIN_TOKEN, "OpenStack-API-Version": "compute 2.81"}
    return httpx.request(method, f"{fleet.api.endpoint}{path}", headers=hdrs, timeout=30, **kw)


def _servers(fleet: Fleet) -> list[dict[str, Any]]:
    servers: list[dict[str, Any]] = _api(fleet, "GET", "/servers/detail").json()["servers"]
    return servers


def test_one_request_for_more_than_fits_and_nodes_that_go_away(fleet: Fleet) -> None:
    wait(lambda: len(fleet.osc("hypervisor", "list", "-f", "json")) == 2)
    body = {
        "server": {
            "name": "many",
            "imageRef": fleet.image_id,
            "flavorRef": "1",
            "networks": "none",
            "min_count": 1,
            "max_count": 10,
        }
    }
    assert _api(fleet, "POST", "/servers", json=body).status_code == 202
    wait(lambda: all(s["status"] in ("ACTIVE", "ERROR") for s in _servers(fleet)), 120)
    servers = _servers(fleet)
    assert sorted(s["status"] for s in servers) == ["ACTIVE"] * 8 + ["ERROR"] * 2
    for s in servers:
        if s["status"] == "ERROR":
            assert s["fault"]["message"].startswith("No valid host was found.")
    on_node = {
        a.hostname: len(a.request("GET", "/v1/servers").json()["servers"]) for a in fleet.agents
    }
    assert on_node == {"node-a": 4, "node-b": 4}

    # node-b stops heartbeating: its servers' host_status turns UNKNOWN, nothing is lost.
    node_b = fleet.agents[1]
    node_b.stop()
    on_b = [s["id"] for s in servers if s.get("OS-EXT-SRV-ATTR:host") == "node-b"]
    wait(lambda: {s["host_status"] for s in _servers(fleet) if s["id"] in on_b} == {"UNKNOWN"})
    node_b.start()  # restarted: it reports the same instances from its disk
    wait(lambda: {s["host_status"] for s in _servers(fleet) if s["id"] in on_b} == {"UP"})
    assert {s["status"] for s in _servers(fleet) if s["id"] in on_b} == {"ACTIVE"}

    # The API restarts: every server is still there, the same, after one heartbeat.
    before = sorted((s["id"], s["status"], s.get("OS-EXT-SRV-ATTR:host")) for s in servers)
    fleet.api.stop()
    fleet.api.start()
    after = sorted((s["id"], s["status"], s.get("OS-EXT-SRV-ATTR:host")) for s in _servers(fleet))
    assert after == before
