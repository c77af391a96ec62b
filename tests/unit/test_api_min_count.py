"""Nova's ``min_count``: a request whose minimum does not fit fails as a whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.unit._api_fakes import api, create, headers, register, wait_for


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api(tmp_path) as (c, _, _):
        yield c


def _detail(client: TestClient) -> list[dict[str, Any]]:
    servers: list[dict[str, Any]] = client.get("/v2.1/servers/detail", headers=headers()).json()[
        "servers"
    ]
    return servers


def _settled(client: TestClient) -> list[dict[str, Any]]:
    wait_for(lambda: all(s["status"] in ("ACTIVE", "ERROR") for s in _detail(client)))
    return _detail(client)


def _used(client: TestClient) -> dict[str, int]:
    hv = client.get("/v2.1/os-hypervisors/detail", headers=headers()).json()["hypervisors"]
    return {h["hypervisor_hostname"]: h["memory_mb_used"] for h in hv}


def test_min_count_above_room_puts_every_server_in_error_and_frees_the_claims(
    client: TestClient,
) -> None:
    register(client, "node-1", vcpus=2, ram_mb=1024, disk_gb=10)  # room for 2 m1.tiny
    assert create(client, "all", min_count=3, max_count=4).status_code == 202
    servers = _settled(client)
    assert sorted(s["status"] for s in servers) == ["ERROR"] * 4
    for s in servers:
        assert s["fault"]["message"].startswith("No valid host was found.")
        assert "min_count=3" in s["fault"]["message"]
    assert _used(client) == {"node-1": 0}
    # The room is still there for a request that fits.
    create(client, "fits", min_count=2, max_count=2)
    fits = [s for s in _settled(client) if s["name"].startswith("fits")]
    assert sorted(s["status"] for s in fits) == ["ACTIVE", "ACTIVE"]


def test_min_count_within_room_boots_the_minimum_and_the_extra_end_in_error(
    client: TestClient,
) -> None:
    register(client, "node-1", vcpus=2, ram_mb=1024, disk_gb=10)  # room for 2 m1.tiny
    create(client, "some", min_count=2, max_count=3)
    servers = _settled(client)
    assert sorted(s["status"] for s in servers) == ["ACTIVE", "ACTIVE", "ERROR"]
    ok = [s for s in servers if s["status"] == "ACTIVE"]
    assert all(s["cowfleet:placement"]["host"] == "node-1" for s in ok)
    assert _used(client) == {"node-1": 1024}


def test_the_servers_of_one_request_follow_each_other_onto_one_host(
    client: TestClient,
) -> None:
    # Two equal hosts, neither holding the image: the first server goes to node-1 (ties go
    # to the name first), and every sibling follows it there, whether it looks at the hosts
    # before, while or after the first one's claim turns into a placement.
    register(client, "node-1", vcpus=8, ram_mb=8192, disk_gb=100)
    register(client, "node-2", vcpus=8, ram_mb=8192, disk_gb=100)
    create(client, "herd", min_count=4, max_count=4)
    servers = _settled(client)
    assert {s["cowfleet:placement"]["host"] for s in servers} == {"node-1"}
    assert sum(s["cowfleet:placement"]["image_on_host"] for s in servers) >= 3
