"""Pre-cache on a real fleet: image service, compute API, three node agents (driver none).

The agents fetch through :class:`CountingProxy`, so the test sees every download the
image service serves. ``openstack aggregate cache image`` (real python-openstackclient)
and ``cowfleet image precache`` both drive the API; the progress resource must reach
``cached`` on every live node, ``skipped`` (with the reason) on a stopped one, and a
second pre-cache must fetch nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cowfleet.errors import CowfleetError
from tests.conftest import wait_until as wait
from tests.fixtures.compute_api import MEMBER_TOKEN
from tests.fixtures.fleet import FleetBase
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "p" * 16
DATA = os.urandom(3 << 20)
HOSTS = (("node-a", "127.0.0.2"), ("node-b", "127.0.0.3"), ("node-c", "127.0.0.4"))


class Fleet(FleetBase):
    def __init__(self, root: Path, factory: Callable[..., ImageService]) -> None:
        super().__init__(root, factory, ADMIN_TOKEN)
        self.image_id = self.images.upload("cirros", DATA, visibility="public")
        self.start_proxy()
        self.start_api(
            {
                "COWFLEET_API_HEARTBEAT_INTERVAL": "0.5",
                "COWFLEET_API_NODE_DOWN_AFTER": "3",
                "COWFLEET_API_NODE_TIMEOUT": "5",
            }
        )
        self.start_agents(HOSTS, image_url=self.proxy.url)
        self.start_cloud("pc")
        self.wait_hypervisors(len(HOSTS))

    def precaches(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.call("GET", "/cowfleet/precache").json()["precaches"]
        return got

    def show(self, pid: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("GET", f"/cowfleet/precache/{pid}").json()["precache"]
        return doc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COWFLEET_", "OS_"))}
        env.update(
            COWFLEET_HOME=str(self.root / "cli-home"),
            COWFLEET_API_URL=self.api.url,
            COWFLEET_API_TOKEN=ADMIN_TOKEN,
            COWFLEET_IMAGE_URL=self.images.url,
            COWFLEET_IMAGE_TOKEN=ADMIN_TOKEN,
        )
        return subprocess.run(
            [sys.executable, "-m", "cowfleet", "image", "precache", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )


@pytest.fixture
def fleet(tmp_path: Path, image_service_factory: Callable[..., ImageService]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, image_service_factory)
    yield f
    f.close()


def _by_host(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["host"]: n for n in doc["nodes"]}


def test_precache_via_openstack_then_cli_fetches_once_and_skips_a_down_node(fleet: Fleet) -> None:
    agg = fleet.cloud.run_json("aggregate", "create", "rack1")
    for host, _ in HOSTS:
        fleet.cloud.run("aggregate", "add", "host", "rack1", host)
    node_c = fleet.agents[2]
    node_c.stop()
    wait(lambda: fleet.cloud.run_json("hypervisor", "show", "node-c")["state"] == "down", 30)

    out = fleet.cloud.run("aggregate", "cache", "image", "rack1", "cirros")
    assert out.strip() == ""
    (first,) = wait(fleet.precaches)
    assert first["target"] == {"aggregate": agg["id"]} and first["image_id"] == fleet.image_id
    done = wait(lambda: (d := fleet.show(first["id"]))["state"] != "running" and d, 90)
    nodes = _by_host(done)
    assert done["state"] == "done", done
    for host, other in (("node-a", "node-b"), ("node-b", "node-a")):
        n = nodes[host]
        # the source that sent most: the origin, or the other node (peers are on)
        assert (n["state"], n["error"]) == ("cached", None), n
        assert n["source"] in ("origin", other), n
        assert n["bytes_done"] == n["bytes_total"] == len(DATA)
    assert "origin" in {nodes["node-a"]["source"], nodes["node-b"]["source"]}
    assert nodes["node-c"]["state"] == "skipped"
    assert "node-c is down" in nodes["node-c"]["error"]
    downloads = fleet.proxy.count(fleet.image_id)
    assert 1 <= downloads <= 2  # at most one download per live node
    for agent in fleet.agents[:2]:
        assert any(agent.instances.glob("_base/[0-9a-f]*[0-9a-f]"))

    # Again, through cowfleet's CLI: every live node already holds it, nothing is fetched.
    got = fleet.cli(fleet.image_id, "--aggregate", "rack1", "--output", "json")
    assert got.returncode == 0, got.stderr
    rows = {r["host"]: r for r in json.loads(got.stdout)}
    assert set(rows) == {"node-a", "node-b", "node-c"}
    for host in ("node-a", "node-b"):
        assert rows[host] == {
            "host": host,
            "state": "cached",
            "bytes_done": len(DATA),
            "bytes_total": len(DATA),
            "source": None,  # already held: fetched from nowhere
            "error": None,
        }
    assert rows["node-c"]["state"] == "skipped" and "down" in rows["node-c"]["error"]
    assert fleet.proxy.count(fleet.image_id) == downloads

    # node-c is back: --host with --watch caches it there, by the image's name.
    node_c.start()
    wait(lambda: fleet.cloud.run_json("hypervisor", "show", "node-c")["state"] == "up", 30)
    got = fleet.cli("cirros", "--host", "node-c", "--watch")
    assert got.returncode == 0, got.stderr
    assert "node-c" in got.stdout and "cached" in got.stdout
    assert fleet.proxy.count(fleet.image_id) <= downloads + 1  # node-a/b hold it: peers
    downloads = fleet.proxy.count(fleet.image_id)
    got = fleet.cli(fleet.image_id, "--all", "--output", "json")
    assert got.returncode == 0, got.stderr
    assert {(r["host"], r["state"], r["source"]) for r in json.loads(got.stdout)} == {
        (h, "cached", None) for h, _ in HOSTS
    }
    assert fleet.proxy.count(fleet.image_id) == downloads


def test_precache_bad_input(fleet: Fleet) -> None:
    agg = fleet.call("POST", "/os-aggregates", json={"aggregate": {"name": "r2"}}).json()
    agg_id = agg["aggregate"]["id"]
    fleet.call("POST", f"/os-aggregates/{agg_id}/action", json={"add_host": {"host": "node-a"}})
    path = f"/os-aggregates/{agg_id}/images"
    unknown = "0c3f4bd2-8a3c-4f54-9c6e-2d1b7f0e7a11"

    r = fleet.call("POST", path, json={"cache": [{"id": unknown}]})
    assert r.status_code == 400 and unknown in r.json()["badRequest"]["message"]
    r = fleet.call("POST", path, json={"cache": [{"id": fleet.image_id}, {"id": fleet.image_id}]})
    assert r.status_code == 400
    assert r.json()["badRequest"]["message"] == "Duplicate images in request."
    # An image the image service never activated (its data refused, or none given).
    from cowfleet.images.client import ImageClient

    with ImageClient(fleet.images.url, ADMIN_TOKEN) as client:
        refused = client.create(name="bad", disk_format="qcow2", container_format="bare")
        with pytest.raises(CowfleetError):
            client.upload(refused.id, iter([b"not a qcow2" * 1000]), size=11000)
        assert client.get(refused.id).status != "active"
    r = fleet.call("POST", path, json={"cache": [{"id": refused.id}]})
    assert r.status_code == 400 and "not active" in r.json()["badRequest"]["message"]
    r = fleet.call("POST", "/cowfleet/precache", json={"image_id": refused.id, "all": True})
    assert r.status_code == 400
    assert (
        fleet.call(
            "POST", "/os-aggregates/999/images", json={"cache": [{"id": unknown}]}
        ).status_code
        == 404
    )
    r = fleet.call("POST", path, token=MEMBER_TOKEN, json={"cache": [{"id": fleet.image_id}]})
    assert r.status_code == 403
    r = fleet.call("GET", "/cowfleet/precache", token=MEMBER_TOKEN)
    assert r.status_code == 403
    r = fleet.call("POST", path, mv="compute 2.80", json={"cache": [{"id": fleet.image_id}]})
    assert r.status_code == 404
    r = fleet.call(
        "POST", "/cowfleet/precache", json={"image_id": fleet.image_id, "hosts": ["nope"]}
    )
    assert r.status_code == 400 and "nope" in r.json()["badRequest"]["message"]
    assert fleet.precaches() == []  # nothing was started by any of these
    assert fleet.proxy.count(fleet.image_id) == 0

    got = fleet.cli(unknown, "--all")
    assert got.returncode == 6 and unknown in got.stderr
