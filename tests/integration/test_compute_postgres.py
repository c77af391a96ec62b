"""The compute API on PostgreSQL: atomic claims, and two replicas serving one fleet.

Each test runs in its own schema of the shared test database
(``COWFLEET_TEST_POSTGRES_URL``), dropped afterwards, so it never meets the image
catalog's tables or another test session's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cowfleet.api.db.engine import Database
from tests.fixtures.compute_api import (
    NODE_TOKEN,
    ComputeApi,
    pg_schema,
    server_body,
    write_tokens,
)
from tests.fixtures.images import ImageService
from tests.integration._node_stub import StubNode
from tests.unit.test_api_claims import check_race

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_schema() as url:
        yield url


def test_concurrent_claims_never_overcommit_postgresql(pg_url: str) -> None:
    db = Database.open(pg_url)
    try:
        check_race(db)
    finally:
        db.close()


def test_migrations_run_once_when_replicas_start_together(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_db() -> None:
        try:
            Database.open(pg_url).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_db) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_two_replicas_share_one_fleet_without_overcommit(
    tmp_path: Path, pg_url: str, image_service: ImageService
) -> None:
    image = image_service.upload("tiny", b"\0" * 4096)
    tokens = write_tokens(tmp_path / "tokens.toml", image_service.token)
    settings = {
        "COWFLEET_API_HEARTBEAT_INTERVAL": "1",
        "COWFLEET_API_CPU_ALLOCATION_RATIO": "1.0",
    }
    replicas = [
        ComputeApi(
            tmp_path / f"api-{i}", image_service.url, tokens, database=pg_url, settings=settings
        )
        for i in range(2)
    ]
    nodes: list[StubNode] = []
    try:
        for r in replicas:
            r.start()
        # Room for exactly 10 m1.tiny (1 vCPU each): 4 + 6 vCPUs.
        nodes = [
            StubNode("node-a", "127.0.0.2", replicas[0].url, NODE_TOKEN, vcpus=4).start(),
            StubNode("node-b", "127.0.0.3", replicas[1].url, NODE_TOKEN, vcpus=6).start(),
        ]
        hdrs = {"X-Auth-Token": image_service.token, "OpenStack-API-Version": "compute 2.81"}
        codes: list[int] = []

        def create(i: int) -> None:
            body = server_body(f"vm-{i}", image)
            resp = httpx.post(
                f"{replicas[i % 2].endpoint}/servers", json=body, headers=hdrs, timeout=60
            )
            codes.append(resp.status_code)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [202] * 20

        def detail(replica: ComputeApi) -> list[dict[str, object]]:
            servers: list[dict[str, object]] = httpx.get(
                f"{replica.endpoint}/servers/detail", headers=hdrs, timeout=30
            ).json()["servers"]
            return servers

        deadline = time.monotonic() + 60
        while any(s["status"] == "BUILD" for s in detail(replicas[0])):
            assert time.monotonic() < deadline, "servers still in BUILD"
            time.sleep(0.3)
        servers = detail(replicas[1])
        assert sorted(s["id"] for s in servers) == sorted(s["id"] for s in detail(replicas[0]))
        statuses = sorted(str(s["status"]) for s in servers)
        assert statuses == ["ACTIVE"] * 10 + ["ERROR"] * 10
        per_host: dict[str, int] = {}
        for s in servers:
            if s["status"] == "ACTIVE":
                host = str(s["OS-EXT-SRV-ATTR:host"])
                per_host[host] = per_host.get(host, 0) + 1
        assert per_host == {"node-a": 4, "node-b": 6}
        assert sum(len(n.instances) for n in nodes) == 10
        hv = httpx.get(
            f"{replicas[0].endpoint}/os-hypervisors/detail", headers=hdrs, timeout=30
        ).json()["hypervisors"]
        assert {h["hypervisor_hostname"]: h["vcpus_used"] for h in hv} == {"node-a": 4, "node-b": 6}
    finally:
        for n in nodes:
            n.stop()
        for r in replicas:
            r.stop()
