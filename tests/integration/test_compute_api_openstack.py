"""Unmodified OpenStack clients against the real compute API on loopback.

``openstack`` (python-openstackclient 10.5, pinned in the ``test`` extra) and
openstacksdk drive ``cowfleet serve api`` with a static token (clouds.yaml as in
docs/compute-api.md). The real image service (``serve images --tokens-file``, the same
tokens file) answers the clients' image lookups, so one token works for both.
The node agents here are :mod:`tests.integration._node_stub` (real HTTP servers on
127.0.0.2 and 127.0.0.3 speaking docs/fleet-protocol.md), not ``cowfleet serve node``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until as wait
from tests.fixtures.compute_api import (
    MEMBER_TOKEN,
    NODE_TOKEN,
    OTHER_TOKEN,
    ComputeApi,
    write_tokens,
)
from tests.fixtures.images import ImageService
from tests.fixtures.openstack import OpenStackCloud
from tests.integration._node_stub import StubNode

pytestmark = pytest.mark.integration

RAW = b"\0" * (1 << 20)


ADMIN_TOKEN = "admin-token-" + "a" * 16


class Fleet:
    """Image service and compute API sharing one tokens file, and stub node agents."""

    def __init__(self, root: Path, factory: Callable[..., ImageService]) -> None:
        self.root = root
        tokens = write_tokens(root / "tokens.toml", ADMIN_TOKEN)
        self.images = images = factory(tokens_file=tokens)
        images.token = self.token = ADMIN_TOKEN  # one token for both services
        self.image_id = images.upload("cirros", RAW, visibility="public")
        self.api = ComputeApi(
            root / "api",
            images.url,
            tokens,
            settings={"COWFLEET_API_HEARTBEAT_INTERVAL": "1", "COWFLEET_API_NODE_TIMEOUT": "3"},
        )
        self.api.start()
        self.nodes: list[StubNode] = []
        self.cloud = OpenStackCloud(
            root, "cowfleet", self.api.endpoint, self.token, images.url, microversion="2.81"
        )

    def node(self, hostname: str, address: str, **kw: Any) -> StubNode:
        node = StubNode(hostname, address, self.api.url, NODE_TOKEN, **kw).start()
        self.nodes.append(node)
        return node

    def env(self) -> dict[str, str]:
        return self.cloud.env()

    def osc(self, *args: str, timeout: float = 120) -> str:
        return self.cloud.run(*args, timeout=timeout)

    def osc_json(self, *args: str) -> Any:
        return self.cloud.run_json(*args)

    def get(self, path: str, token: str | None = None) -> httpx.Response:
        return httpx.get(
            f"{self.api.endpoint}{path}",
            timeout=10,
            headers={"X-Auth-Token": token or self.token, "OpenStack-API-Version": "compute 2.81"},
        )

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.api.stop()


@pytest.fixture
def fleet(tmp_path: Path, image_service_factory: Callable[..., ImageService]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, image_service_factory)
    yield f
    f.close()


def test_openstack_cli_runs_the_whole_life_cycle(fleet: Fleet) -> None:
    fleet.node("node-a", "127.0.0.2")
    fleet.node("node-b", "127.0.0.3")
    flavors = fleet.osc_json("flavor", "list")
    assert {"m1.tiny", "m1.small"} <= {f["Name"] for f in flavors}
    hypervisors = fleet.osc_json("hypervisor", "list")
    assert sorted(h["Hypervisor Hostname"] for h in hypervisors) == ["node-a", "node-b"]
    assert {h["Host IP"] for h in hypervisors} == {"127.0.0.2", "127.0.0.3"}
    shown_hv = fleet.osc_json("hypervisor", "show", "node-a")
    assert (shown_hv["hypervisor_hostname"], shown_hv["state"]) == ("node-a", "up")
    agg = fleet.osc_json("aggregate", "create", "rack1")
    assert agg["name"] == "rack1"
    added = fleet.osc_json("aggregate", "add", "host", "rack1", "node-a")
    assert added["hosts"] == ["node-a"]

    created = fleet.osc_json(
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
    )
    assert created["status"] == "ACTIVE"
    listing = fleet.osc_json("server", "list", "--long")
    (row,) = listing
    assert (row["Name"], row["Status"], row["Flavor"]) == ("vm1", "ACTIVE", "m1.tiny")
    assert (row["Power State"], row["Host Status"]) == (1, "UP")
    assert row["Host"] in ("node-a", "node-b") and row["Image Name"] == "cirros"
    shown = fleet.osc_json("server", "show", "vm1")
    assert shown["OS-EXT-SRV-ATTR:host"] == row["Host"]
    assert shown["OS-EXT-STS:vm_state"] == "active"
    placement = fleet.get(f"/servers/{shown['id']}").json()["server"]["cowfleet:placement"]
    assert placement["host"] == row["Host"] and placement["hosts_considered"] == 2

    fleet.osc("server", "stop", "vm1")
    wait(lambda: fleet.osc_json("server", "show", "vm1")["status"] == "SHUTOFF")
    fleet.osc("server", "start", "vm1")
    wait(lambda: fleet.osc_json("server", "show", "vm1")["status"] == "ACTIVE")
    fleet.osc("server", "reboot", "--hard", "--wait", "vm1")
    assert fleet.osc_json("server", "show", "vm1")["status"] == "ACTIVE"
    fleet.osc("server", "delete", "--wait", "vm1")
    assert fleet.osc_json("server", "list") == []
    assert all(not n.instances for n in fleet.nodes)


def test_openstacksdk_runs_the_same(fleet: Fleet) -> None:
    import openstack

    fleet.node("node-a", "127.0.0.2")
    conn = openstack.connect(
        auth_type="admin_token",
        auth={"endpoint": fleet.api.endpoint, "token": fleet.token},
        compute_endpoint_override=fleet.api.endpoint,
        image_endpoint_override=fleet.images.url,
        identity_endpoint_override=fleet.api.endpoint,
        identity_api_version="3",
    )
    flavor = conn.compute.find_flavor("m1.tiny")
    server = conn.compute.create_server(
        name="sdk1", image_id=fleet.image_id, flavor_id=flavor.id, networks="none"
    )
    server = conn.compute.wait_for_server(server, wait=60)
    assert server.status == "ACTIVE" and server.compute_host == "node-a"
    conn.compute.stop_server(server)
    conn.compute.wait_for_server(server, status="SHUTOFF", wait=60)
    conn.compute.start_server(server)
    conn.compute.wait_for_server(server, status="ACTIVE", wait=60)
    conn.compute.reboot_server(server, "SOFT")
    conn.compute.wait_for_server(server, status="ACTIVE", wait=60)
    assert [h.name for h in conn.compute.hypervisors()] == ["node-a"]
    agg = conn.compute.create_aggregate(name="sdk-agg")
    conn.compute.add_host_to_aggregate(agg, "node-a")
    assert conn.compute.get_aggregate(agg).hosts == ["node-a"]
    conn.compute.delete_server(server)
    conn.compute.wait_for_delete(server, wait=60)
    assert list(conn.compute.servers()) == []


def test_a_node_answering_garbage_or_hanging_is_passed_over(fleet: Fleet) -> None:
    bad = fleet.node("node-bad", "127.0.0.2", ram_mb=16384, mode="garbage")
    slow = fleet.node("node-slow", "127.0.0.3", ram_mb=12288, mode="hang")
    fleet.node("node-good", "127.0.0.4", ram_mb=4096)
    created = fleet.osc_json(
        "server",
        "create",
        "--image",
        "cirros",
        "--flavor",
        "m1.tiny",
        "--nic",
        "none",
        "--wait",
        "vm-retry",
    )
    assert created["status"] == "ACTIVE"
    shown = fleet.get(f"/servers/{created['id']}").json()["server"]
    assert shown["OS-EXT-SRV-ATTR:host"] == "node-good"
    assert shown["cowfleet:placement"]["attempt"] == 3
    assert bad.builds and slow.builds


def test_a_member_cannot_see_another_projects_server(fleet: Fleet) -> None:
    fleet.node("node-a", "127.0.0.2")
    created = fleet.osc_json(
        "server",
        "create",
        "--image",
        "cirros",
        "--flavor",
        "m1.tiny",
        "--nic",
        "none",
        "--wait",
        "private",
    )
    other = fleet.get(f"/servers/{created['id']}", token=OTHER_TOKEN)
    assert other.status_code == 404
    assert other.json()["itemNotFound"]["message"] == (
        f"Instance {created['id']} could not be found."
    )
    assert fleet.get("/servers", token="wrong-token-000000000").status_code == 401


def test_image_visibility_follows_the_project_through_the_api(fleet: Fleet) -> None:
    """One tokens file: a member's private image boots for its project only."""
    from cowfleet.images.client import ImageClient

    fleet.node("node-a", "127.0.0.2")
    with ImageClient(fleet.images.url, MEMBER_TOKEN) as client:
        image = client.create(name="alpha-only", disk_format="raw", container_format="bare")
        client.upload(image.id, iter([RAW]), size=len(RAW))

    def create(token: str) -> httpx.Response:
        body = {
            "server": {"name": "p", "imageRef": str(image.id), "flavorRef": "1", "networks": "none"}
        }
        return httpx.post(
            f"{fleet.api.endpoint}/servers",
            json=body,
            timeout=30,
            headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.81"},
        )

    refused = create(OTHER_TOKEN)
    assert refused.status_code == 400
    assert refused.json()["badRequest"]["message"] == f"Image {image.id} could not be found."
    accepted = create(MEMBER_TOKEN)
    assert accepted.status_code == 202
    sid = accepted.json()["server"]["id"]
    wait(
        lambda: (
            fleet.get(f"/servers/{sid}", token=MEMBER_TOKEN).json()["server"]["status"] == "ACTIVE"
        )
    )
