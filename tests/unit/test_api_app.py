"""The compute API over HTTP (TestClient) with fake node agents and image service."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.unit._api_fakes import (
    ADMIN,
    IMAGE,
    MEMBER_A,
    MEMBER_B,
    NODE,
    PRIVATE_B,
    api,
    create,
    headers,
    register,
    status_of,
    wait_for,
)


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    with api(tmp_path) as (c, _, _):
        yield c  # type: ignore[misc]


def fault(resp: object) -> tuple[str, int, str]:
    doc = resp.json()  # type: ignore[attr-defined]
    ((name, body),) = doc.items()
    return name, body["code"], body["message"]


# -- versions, microversions, faults ---------------------------------------------------


def test_version_documents_need_no_token_and_carry_no_microversion(client: TestClient) -> None:
    root = client.get("/")
    assert root.status_code == 200 and root.json()["versions"][0]["id"] == "v2.1"
    for path in ("/v2.1", "/v2.1/"):
        doc = client.get(path).json()["version"]
        assert (doc["version"], doc["min_version"], doc["status"]) == ("2.81", "2.1", "CURRENT")
        assert doc["links"][0]["rel"] == "self"
        assert "openstack-api-version" not in client.get(path).headers


def test_microversion_headers_and_errors(client: TestClient) -> None:
    ok = client.get("/v2.1/flavors", headers=headers(version="2.61"))
    assert ok.headers["openstack-api-version"] == "compute 2.61"
    assert ok.headers["x-openstack-nova-api-version"] == "2.61"
    assert "OpenStack-API-Version" in ok.headers["vary"]
    latest = client.get("/v2.1/flavors", headers=headers(version="latest"))
    assert latest.headers["openstack-api-version"] == "compute 2.81"
    none = client.get("/v2.1/flavors", headers={"X-Auth-Token": ADMIN})
    assert none.headers["openstack-api-version"] == "compute 2.1"
    assert fault(client.get("/v2.1/flavors", headers=headers(version="2.200"))) == (
        "computeFault",
        406,
        "Version 2.200 is not supported by the API. Minimum is 2.1 and maximum is 2.81.",
    )
    assert fault(client.get("/v2.1/flavors", headers=headers(version="two")))[:2] == (
        "badRequest",
        400,
    )


def test_every_error_is_a_nova_fault(client: TestClient) -> None:
    assert fault(client.get("/v2.1/servers"))[:2] == ("unauthorized", 401)
    assert fault(client.get("/v2.1/servers", headers=headers("wrong-token-xxxxxxxx")))[:2] == (
        "unauthorized",
        401,
    )
    assert fault(client.get("/v2.1/nothing-here", headers=headers()))[:2] == ("itemNotFound", 404)
    assert fault(client.patch("/v2.1/servers", headers=headers()))[:2] == ("badMethod", 405)
    assert fault(client.post("/v2.1/servers", content=b"{nope", headers=headers()))[:2] == (
        "badRequest",
        400,
    )
    big = b'{"server": {"name": "' + b"x" * (2 << 20) + b'"}}'
    assert fault(client.post("/v2.1/servers", content=big, headers=headers()))[:2] == (
        "overLimit",
        413,
    )
    # Node tokens are for /internal only, user tokens never reach /internal.
    assert fault(client.get("/v2.1/servers", headers=headers(NODE)))[:2] == ("forbidden", 403)
    internal = client.put("/internal/nodes/n1", json={}, headers={"X-Auth-Token": ADMIN})
    assert internal.status_code == 403 and internal.json()["error"]["code"] == 403


def test_a_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b" " * 65536

    resp = client.post("/v2.1/servers", content=chunks(), headers=headers())
    assert fault(resp)[:2] == ("overLimit", 413)


# -- servers ---------------------------------------------------------------------------


def test_create_places_builds_and_shows_why(client: TestClient) -> None:
    register(client, "node-1")
    register(client, "node-2", cache=[{"image_id": IMAGE, "verified": True, "bytes": 1}])
    resp = create(client, "vm1")
    assert resp.status_code == 202
    sid = resp.json()["server"]["id"]
    assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
    s = client.get(f"/v2.1/servers/{sid}", headers=headers()).json()["server"]
    assert s["OS-EXT-SRV-ATTR:host"] == "node-2"  # the node that holds the image
    assert s["OS-EXT-SRV-ATTR:hypervisor_hostname"] == "node-2"
    assert (s["OS-EXT-STS:vm_state"], s["OS-EXT-STS:power_state"]) == ("active", 1)
    assert s["OS-EXT-STS:task_state"] is None and s["host_status"] == "UP"
    assert s["flavor"]["original_name"] == "m1.tiny" and s["image"]["id"] == IMAGE
    placement = s["cowfleet:placement"]
    assert placement["host"] == "node-2" and placement["image_on_host"] is True
    assert placement["weights"]["cache"] > 0 and "RamFilter" in placement["filters"]
    old = client.get(f"/v2.1/servers/{sid}", headers=headers(version="2.1")).json()["server"]
    assert old["flavor"]["id"] == "1" and "host_status" not in old


def test_bad_create_requests_are_400_with_novas_messages(client: TestClient) -> None:
    register(client, "node-1")
    assert fault(create(client, flavorRef="99")) == (
        "badRequest",
        400,
        "Flavor 99 could not be found.",
    )
    missing = str(uuid.uuid4())
    assert fault(create(client, imageRef=missing)) == (
        "badRequest",
        400,
        f"Image {missing} could not be found.",
    )
    assert fault(create(client, "x" * 256))[:2] == ("badRequest", 400)
    assert "not a UUID" in fault(create(client, imageRef="not-a-uuid"))[2]
    no_networks = {"name": "n", "imageRef": IMAGE, "flavorRef": "1"}
    assert fault(client.post("/v2.1/servers", json={"server": no_networks}, headers=headers()))[
        :2
    ] == ("badRequest", 400)
    assert fault(create(client, networks=[{"uuid": str(uuid.uuid4())}]))[:2] == ("badRequest", 400)
    assert fault(create(client, min_count=3, max_count=2))[:2] == ("badRequest", 400)


def test_the_bdm_entry_osc_sends_is_accepted(client: TestClient) -> None:
    register(client, "node-1")
    bdm = [
        {
            "uuid": IMAGE,
            "boot_index": 0,
            "source_type": "image",
            "destination_type": "local",
            "delete_on_termination": True,
        }
    ]
    assert create(client, block_device_mapping_v2=bdm, min_count=1, max_count=1).status_code == 202
    volume = [
        {"uuid": IMAGE, "boot_index": 0, "source_type": "image", "destination_type": "volume"}
    ]
    assert fault(create(client, block_device_mapping_v2=volume))[:2] == ("badRequest", 400)


def test_a_member_sees_only_its_project(client: TestClient) -> None:
    register(client, "node-1")
    sid = create(client, "mine", token=MEMBER_A).json()["server"]["id"]
    assert client.get(f"/v2.1/servers/{sid}", headers=headers(MEMBER_A)).status_code == 200
    other = client.get(f"/v2.1/servers/{sid}", headers=headers(MEMBER_B))
    assert fault(other) == ("itemNotFound", 404, f"Instance {sid} could not be found.")
    assert client.delete(f"/v2.1/servers/{sid}", headers=headers(MEMBER_B)).status_code == 404
    assert client.get("/v2.1/servers", headers=headers(MEMBER_B)).json()["servers"] == []
    assert (
        "OS-EXT-SRV-ATTR:host"
        not in client.get(f"/v2.1/servers/{sid}", headers=headers(MEMBER_A)).json()["server"]
    )
    admin_own = client.get("/v2.1/servers", headers=headers()).json()["servers"]
    assert admin_own == []
    every = client.get("/v2.1/servers?all_tenants=1", headers=headers()).json()["servers"]
    assert [s["id"] for s in every] == [sid]
    # A private image of another project is "not found" for this one.
    assert fault(create(client, token=MEMBER_A, imageRef=PRIVATE_B))[:2] == ("badRequest", 400)
    assert create(client, token=MEMBER_B, imageRef=PRIVATE_B).status_code == 202


def test_more_servers_than_room_end_in_error_no_valid_host(client: TestClient) -> None:
    register(client, "node-1", vcpus=2, ram_mb=1024, disk_gb=10)  # room for 2 m1.tiny
    create(client, "many", min_count=1, max_count=3)
    detail = lambda: client.get("/v2.1/servers/detail", headers=headers()).json()["servers"]  # noqa: E731
    wait_for(lambda: all(s["status"] in ("ACTIVE", "ERROR") for s in detail()))
    servers = detail()
    assert sorted(s["status"] for s in servers) == ["ACTIVE", "ACTIVE", "ERROR"]
    assert sorted(s["name"] for s in servers) == ["many-1", "many-2", "many-3"]
    (err,) = [s for s in servers if s["status"] == "ERROR"]
    assert err["fault"]["message"].startswith("No valid host was found.")
    assert err["fault"]["code"] == 500


def test_a_failing_node_is_retried_elsewhere_then_error(tmp_path: Path) -> None:
    with api(tmp_path, build_attempts=2) as (client, nodes, _):
        register(client, "bad")
        register(client, "good", ram_mb=4096)  # less free RAM: "bad" is tried first
        nodes.failing.add("http://bad.test:8775")
        sid = create(client).json()["server"]["id"]
        assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
        s = client.get(f"/v2.1/servers/{sid}", headers=headers()).json()["server"]
        assert s["OS-EXT-SRV-ATTR:host"] == "good"
        assert s["cowfleet:placement"]["attempt"] == 2
        hv = client.get("/v2.1/os-hypervisors/detail", headers=headers()).json()["hypervisors"]
        assert {h["hypervisor_hostname"]: h["memory_mb_used"] for h in hv} == {
            "bad": 0,
            "good": 512,
        }
        nodes.failing.add("http://good.test:8775")
        sid2 = create(client).json()["server"]["id"]
        assert wait_for(lambda: status_of(client, sid2) == "ERROR")
        msg = client.get(f"/v2.1/servers/{sid2}", headers=headers()).json()["server"]["fault"]
        assert "No valid host was found" in msg["message"]


def test_actions_and_nova_conflicts(client: TestClient) -> None:
    register(client, "node-1")
    sid = create(client).json()["server"]["id"]
    wait_for(lambda: status_of(client, sid) == "ACTIVE")
    act = lambda body: client.post(f"/v2.1/servers/{sid}/action", json=body, headers=headers())  # noqa: E731
    assert act({"os-stop": None}).status_code == 202
    assert wait_for(lambda: status_of(client, sid) == "SHUTOFF")
    assert fault(act({"os-stop": None})) == (
        "conflictingRequest",
        409,
        f"Cannot 'stop' instance {sid} while it is in vm_state stopped",
    )
    assert fault(act({"reboot": {"type": "SOFT"}}))[:2] == ("conflictingRequest", 409)
    assert act({"os-start": {}}).status_code == 202
    assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
    assert act({"reboot": {"type": "hard"}}).status_code == 202
    assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
    assert fault(act({"reboot": {"type": "WARM"}}))[:2] == ("badRequest", 400)
    assert fault(act({"pause": None}))[:2] == ("badRequest", 400)


def test_delete_frees_the_claim_and_then_404(client: TestClient) -> None:
    register(client, "node-1")
    sid = create(client).json()["server"]["id"]
    wait_for(lambda: status_of(client, sid) == "ACTIVE")
    assert client.delete(f"/v2.1/servers/{sid}", headers=headers()).status_code == 204
    assert status_of(client, sid) == "404"
    used = lambda: client.get("/v2.1/os-hypervisors/detail", headers=headers()).json()[  # noqa: E731
        "hypervisors"
    ][0]["memory_mb_used"]
    assert wait_for(lambda: used() == 0)


def test_list_filters_and_paging(client: TestClient) -> None:
    register(client, "node-1")
    ids = [create(client, f"web-{i}").json()["server"]["id"] for i in range(5)]
    create(client, "db-0")
    page = client.get("/v2.1/servers/detail?limit=2&name=web", headers=headers()).json()
    assert [s["id"] for s in page["servers"]] == ids[::-1][:2]
    nxt = page["servers_links"][0]
    assert nxt["rel"] == "next" and f"marker={ids[3]}" in nxt["href"]
    page2 = client.get(
        f"/v2.1/servers/detail?limit=2&name=web&marker={ids[3]}", headers=headers()
    ).json()
    assert [s["id"] for s in page2["servers"]] == [ids[2], ids[1]]
    brief = client.get("/v2.1/servers?name=db", headers=headers()).json()["servers"]
    assert [s["name"] for s in brief] == ["db-0"] and set(brief[0]) == {"id", "name", "links"}
    wait_for(
        lambda: (
            len(client.get("/v2.1/servers?status=ACTIVE", headers=headers()).json()["servers"]) == 6
        )
    )
    assert client.get("/v2.1/servers?host=node-2", headers=headers()).json()["servers"] == []
    assert fault(client.get("/v2.1/servers?marker=nope", headers=headers()))[:2] == (
        "badRequest",
        400,
    )


def test_heartbeats_reconcile_and_a_silent_node_is_unknown(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, clock):
        register(client, "node-1")
        sid = create(client).json()["server"]["id"]
        wait_for(lambda: status_of(client, sid) == "ACTIVE")
        stray = str(uuid.uuid4())
        listed = [
            {"uuid": sid, "state": "SHUTOFF", "power_state": 4, "fault": None},
            {"uuid": stray, "state": "ACTIVE", "power_state": 1, "fault": None},
        ]
        register(client, "node-1", instances=listed)
        # A heartbeat right after the change may carry a list taken before it.
        assert status_of(client, sid) == "ACTIVE"
        clock.now += 61  # past the grace (max(3 heartbeats, 30 s))
        register(client, "node-1", instances=listed)
        assert status_of(client, sid) == "SHUTOFF"  # the API takes the node's state
        hv = client.get("/v2.1/os-hypervisors/detail", headers=headers()).json()["hypervisors"][0]
        assert hv["cowfleet:unknown_instances"] == [stray]
        assert not [d for d in nodes.deletes if d[1] == stray]  # never deleted
        clock.now += 120  # past node_down_after
        s = client.get(f"/v2.1/servers/{sid}", headers=headers()).json()["server"]
        assert s["host_status"] == "UNKNOWN"
        assert (
            client.get("/v2.1/os-hypervisors", headers=headers()).json()["hypervisors"][0]["state"]
            == "down"
        )


def test_a_server_deleted_while_its_node_was_away_is_deleted_on_return(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, _):
        register(client, "node-1")
        sid = create(client).json()["server"]["id"]
        wait_for(lambda: status_of(client, sid) == "ACTIVE")
        client.delete(f"/v2.1/servers/{sid}", headers=headers())
        wait_for(lambda: nodes.deletes)
        nodes.deletes.clear()
        register(client, "node-1", instances=[{"uuid": sid, "state": "ACTIVE", "power_state": 1}])
        assert wait_for(lambda: nodes.deletes) == [("http://node-1.test:8775", sid)]


def test_heartbeat_validation(client: TestClient) -> None:
    bad = client.put(
        "/internal/nodes/node-1",
        headers={"X-Auth-Token": NODE},
        json={
            "hostname": "node-1",
            "url": "ftp://x",
            "hypervisor_type": "none",
            "vcpus": 1,
            "ram_mb": 1,
            "disk_gb": 1,
        },
    )
    assert bad.status_code == 400 and "url" in bad.json()["error"]["message"]
    other = client.put(
        "/internal/nodes/node-1", headers={"X-Auth-Token": NODE}, json={"hostname": "node-2"}
    )
    assert other.status_code == 400


# -- flavors, hypervisors, aggregates --------------------------------------------------


def test_flavors(client: TestClient) -> None:
    detail = client.get("/v2.1/flavors/detail?is_public=None", headers=headers(version="2.61"))
    names = {f["name"]: f for f in detail.json()["flavors"]}
    assert {"m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"} <= set(names)
    tiny = names["m1.tiny"]
    assert (tiny["id"], tiny["vcpus"], tiny["ram"], tiny["disk"]) == ("1", 1, 512, 1)
    assert tiny["extra_specs"] == {}
    assert client.get("/v2.1/flavors/1/os-extra_specs", headers=headers()).json() == {
        "extra_specs": {}
    }
    assert fault(client.get("/v2.1/flavors/m1.tiny", headers=headers()))[:2] == (
        "itemNotFound",
        404,
    )  # by name: 404, and the client falls back to the list
    body = {"flavor": {"name": "c1", "vcpus": 2, "ram": 256, "disk": 3}}
    assert client.post("/v2.1/flavors", json=body, headers=headers(MEMBER_A)).status_code == 403
    made = client.post("/v2.1/flavors", json=body, headers=headers())
    assert made.status_code == 200 and made.json()["flavor"]["id"] == "c1"
    assert client.post("/v2.1/flavors", json=body, headers=headers()).status_code == 409
    assert client.delete("/v2.1/flavors/c1", headers=headers()).status_code == 202
    assert client.get("/v2.1/flavors/c1", headers=headers()).status_code == 404


def test_hypervisor_ids_follow_the_microversion(client: TestClient) -> None:
    node_id = register(client, "node-1")["node_id"]
    new = client.get("/v2.1/os-hypervisors/detail", headers=headers(version="2.53")).json()
    assert new["hypervisors"][0]["id"] == node_id
    assert new["hypervisors"][0]["host_ip"] == "node-1.test"  # the host of its URL
    assert new["hypervisors"][0]["cpu_info"] == {}  # an object from 2.28 (osc needs it)
    old = client.get("/v2.1/os-hypervisors/detail", headers=headers(version="2.52")).json()
    assert isinstance(old["hypervisors"][0]["id"], int)
    old_cpu = client.get("/v2.1/os-hypervisors/detail", headers=headers(version="2.27")).json()
    assert old_cpu["hypervisors"][0]["cpu_info"] == "{}"
    assert client.get("/v2.1/os-hypervisors", headers=headers(MEMBER_A)).status_code == 403
    shown = client.get(f"/v2.1/os-hypervisors/{node_id}", headers=headers(version="2.53"))
    assert shown.json()["hypervisor"]["hypervisor_hostname"] == "node-1"
    # osc's "hypervisor show" asks for the uptime below 2.88 and takes 501 as "none".
    uptime = client.get(f"/v2.1/os-hypervisors/{node_id}/uptime", headers=headers())
    assert fault(uptime)[:2] == ("notImplemented", 501)
    missing = client.get(f"/v2.1/os-hypervisors/{uuid.uuid4()}/uptime", headers=headers())
    assert fault(missing)[:2] == ("itemNotFound", 404)


def test_aggregates(client: TestClient) -> None:
    register(client, "node-1")
    agg = client.post(
        "/v2.1/os-aggregates", json={"aggregate": {"name": "rack1"}}, headers=headers()
    ).json()["aggregate"]
    assert isinstance(agg["id"], int) and agg["hosts"] == [] and "uuid" in agg
    path = f"/v2.1/os-aggregates/{agg['id']}"

    def add(host):
        return client.post(
            f"{path}/action",
            json={"add_host": {"host": host}},
            headers=headers(),
        )

    assert fault(add("ghost"))[:2] == ("itemNotFound", 404)
    assert add("node-1").json()["aggregate"]["hosts"] == ["node-1"]
    assert fault(add("node-1"))[:2] == ("conflictingRequest", 409)
    assert (
        client.post(
            "/v2.1/os-aggregates", json={"aggregate": {"name": "rack1"}}, headers=headers()
        ).status_code
        == 409
    )
    assert fault(client.get("/v2.1/os-aggregates/rack1", headers=headers()))[:2] == (
        "badRequest",
        400,
    )
    assert client.get(path, headers=headers()).json()["aggregate"]["hosts"] == ["node-1"]
    assert client.delete(path, headers=headers()).status_code == 400  # still has a host
    client.post(f"{path}/action", json={"remove_host": {"host": "node-1"}}, headers=headers())
    assert client.delete(path, headers=headers()).status_code == 200
    assert client.get("/v2.1/os-aggregates", headers=headers()).json() == {"aggregates": []}


def test_a_stale_copy_on_another_node_is_deleted_there(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, _):
        register(client, "node-1")
        register(client, "node-2", ram_mb=4096)
        sid = create(client).json()["server"]["id"]
        wait_for(lambda: status_of(client, sid) == "ACTIVE")
        # node-2 still holds a copy from a build the API moved to node-1.
        register(
            client,
            "node-2",
            ram_mb=4096,
            instances=[{"uuid": sid, "state": "ERROR", "power_state": 0, "fault": "x"}],
        )
        assert wait_for(lambda: nodes.deletes) == [("http://node-2.test:8775", sid)]
        assert status_of(client, sid) == "ACTIVE"
        hv = client.get("/v2.1/os-hypervisors/detail", headers=headers()).json()["hypervisors"]
        assert all(h["cowfleet:unknown_instances"] == [] for h in hv)


def test_a_deleted_event_releases_the_claim(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, _):
        register(client, "node-1")
        sid = create(client).json()["server"]["id"]
        wait_for(lambda: status_of(client, sid) == "ACTIVE")
        nodes.delete = lambda url, uuid: False  # type: ignore[method-assign]  # 202: later
        client.delete(f"/v2.1/servers/{sid}", headers=headers())

        def used() -> int:
            hv = client.get("/v2.1/os-hypervisors/detail", headers=headers()).json()
            return int(hv["hypervisors"][0]["memory_mb_used"])

        assert used() == 512
        resp = client.post(
            "/internal/nodes/node-1/events",
            headers={"X-Auth-Token": NODE},
            json={"uuid": sid, "state": "DELETED", "power_state": 0},
        )
        assert resp.status_code == 204
        assert used() == 0


def test_settle_gc_freezes_start_up_objects_and_widens_the_young_generation() -> None:
    import gc

    from cowfleet.serving import GC_THRESHOLDS, settle_gc

    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
