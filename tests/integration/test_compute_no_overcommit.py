"""No overcommit, end to end: 40 concurrent creates onto 4 real node agents with room for 20.

The small-scale twin of ``bench/no_overcommit.py`` (400 onto 200): the image service,
the compute API (SQLite with one replica; PostgreSQL with two, the clients and the
nodes' heartbeats alternating between them) and four ``cowfleet serve node --driver
none`` offering 2, 4, 6 and 8 vCPUs at a CPU allocation ratio of 1.0. Exactly 20
servers end ACTIVE, 20 ERROR with "No valid host was found.", and no node holds more
than it offers: by the servers' hosts, by the API's usage, and by the agents' own lists.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until as wait
from tests.fixtures.compute_api import (
    ComputeApi,
    pg_schema,
    server_body,
    write_tokens,
)
from tests.fixtures.fleet import node_token_file
from tests.fixtures.images import ImageService
from tests.fixtures.node_agent import NodeAgent

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "c" * 16
ROOM = {"node-a": 2, "node-b": 4, "node-c": 6, "node-d": 8}  # 20 m1.tiny in all
CREATES = 40
HEADERS = {"X-Auth-Token": ADMIN_TOKEN, "OpenStack-API-Version": "compute 2.81"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[tuple[str | None, int]]:
    """(database URL or None for the API's SQLite file, API replicas)."""
    if request.param == "sqlite":
        yield None, 1
        return
    with pg_schema() as url:
        yield url, 2


def _servers(api: ComputeApi) -> list[dict[str, Any]]:
    resp = httpx.get(f"{api.endpoint}/servers/detail", headers=HEADERS, timeout=30)
    assert resp.status_code == 200, resp.text
    servers: list[dict[str, Any]] = resp.json()["servers"]
    return servers


def test_concurrent_creates_fill_the_room_exactly_and_no_node_overcommits(
    tmp_path: Path,
    image_service_factory: Callable[..., ImageService],
    database: tuple[str | None, int],
) -> None:
    url, replicas = database
    tokens = write_tokens(tmp_path / "tokens.toml", ADMIN_TOKEN)
    images = image_service_factory(tokens_file=tokens)
    images.token = ADMIN_TOKEN
    image = images.upload("tiny", b"\0" * 65536, visibility="public")
    settings = {"COWFLEET_API_HEARTBEAT_INTERVAL": "1", "COWFLEET_API_CPU_ALLOCATION_RATIO": "1.0"}
    apis = [
        ComputeApi(tmp_path / f"api-{i}", images.url, tokens, database=url, settings=settings)
        for i in range(replicas)
    ]
    node_token = node_token_file(tmp_path)
    agents = [
        NodeAgent(
            tmp_path / name,
            apis[i % replicas].url,
            images.url,
            node_token,
            host=f"127.0.0.{i + 2}",
            hostname=name,
            capacity=(vcpus, 1 << 20, 10_000),
        )
        for i, (name, vcpus) in enumerate(ROOM.items())
    ]
    try:
        for api in apis:
            api.start()
        for agent in agents:
            agent.start()
        wait(
            lambda: (
                len(
                    httpx.get(
                        f"{apis[0].endpoint}/os-hypervisors", headers=HEADERS, timeout=30
                    ).json()["hypervisors"]
                )
                == len(ROOM)
            )
        )
        codes: list[int] = []
        gate = threading.Barrier(CREATES)

        def create(i: int) -> None:
            body = server_body(f"vm-{i}", image)
            gate.wait()
            resp = httpx.post(
                f"{apis[i % replicas].endpoint}/servers", json=body, headers=HEADERS, timeout=120
            )
            codes.append(resp.status_code)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(CREATES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [202] * CREATES
        wait(lambda: all(s["status"] != "BUILD" for s in _servers(apis[-1])), 180)
        servers = _servers(apis[0])
        if replicas > 1:
            assert sorted(s["id"] for s in servers) == sorted(s["id"] for s in _servers(apis[1]))
        assert sorted(s["status"] for s in servers) == ["ACTIVE"] * 20 + ["ERROR"] * 20
        for s in servers:
            if s["status"] == "ERROR":
                assert s["fault"]["message"].startswith("No valid host was found."), s["fault"]
        per_host: dict[str, int] = {}
        for s in servers:
            if s["status"] == "ACTIVE":
                host = s["OS-EXT-SRV-ATTR:host"]
                per_host[host] = per_host.get(host, 0) + s["flavor"]["vcpus"]
        assert per_host == ROOM  # full, and not one vCPU over, on every node
        hv = httpx.get(f"{apis[0].endpoint}/os-hypervisors/detail", headers=HEADERS, timeout=30)
        assert {h["hypervisor_hostname"]: h["vcpus_used"] for h in hv.json()["hypervisors"]} == ROOM
        on_nodes = {
            a.hostname: sum(
                i["state"] == "ACTIVE" for i in a.request("GET", "/v1/servers").json()["servers"]
            )
            for a in agents
        }
        assert on_nodes == ROOM
    finally:
        for agent in agents:
            agent.stop()
        for api in apis:
            api.stop()
