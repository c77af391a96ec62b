"""The compute API assigns peer sources at dispatch (api.distribution): holders from
heartbeat inventory, nodes still fetching from in-flight builds, bounded fan-out,
flagged peers left out until their base is gone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.unit._api_fakes import (
    ADMIN,
    IMAGE,
    NODE,
    api,
    create,
    headers,
    register,
    status_of,
    wait_for,
)

HELD = [{"image_id": IMAGE, "verified": True, "bytes": 1}]


def _spec_of(nodes: Any, server_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        with nodes.lock:
            for _url, spec in nodes.builds:
                if spec["uuid"] == server_id:
                    return spec
        return None

    spec = wait_for(find)
    assert isinstance(spec, dict)
    return spec


def test_a_build_on_a_node_without_the_image_names_the_holder(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, _clock):
        register(client, "holder", ram_mb=256, cache=HELD)  # too small to build on
        register(client, "node-2")
        sid = create(client).json()["server"]["id"]
        assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
        spec = _spec_of(nodes, sid)
        assert spec["sources"] == [{"host": "holder", "url": "http://holder.test:8775"}]


def test_a_build_on_a_node_that_holds_the_image_has_no_sources(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, _clock):
        register(client, "holder", cache=HELD)
        sid = create(client).json()["server"]["id"]
        assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
        assert "sources" not in _spec_of(nodes, sid)


def test_fanout_zero_means_the_origin_only(tmp_path: Path) -> None:
    with api(tmp_path, peer_fanout=0) as (client, nodes, _clock):
        register(client, "holder", ram_mb=256, cache=HELD)
        register(client, "node-2")
        sid = create(client).json()["server"]["id"]
        assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
        assert "sources" not in _spec_of(nodes, sid)


def test_later_builds_stream_from_nodes_still_fetching(tmp_path: Path) -> None:
    with api(tmp_path, peer_fanout=1, peer_stripes=1) as (client, nodes, _clock):
        nodes.build = lambda url, spec: (  # type: ignore[method-assign]
            nodes.builds.append((url, spec)) or {"uuid": spec["uuid"], "state": "BUILDING"}
        )
        register(client, "holder", ram_mb=256, cache=HELD)
        register(client, "node-2", ram_mb=512)  # room for one m1.tiny each
        register(client, "node-3", ram_mb=512)
        first = create(client, "vm1").json()["server"]["id"]
        one = _spec_of(nodes, first)
        second = create(client, "vm2").json()["server"]["id"]
        two = _spec_of(nodes, second)
        assert [s["host"] for s in one["sources"]] == ["holder"]
        # the holder feeds one node (fanout 1): the second streams from the first
        placed = {url for url, spec in nodes.builds if spec["uuid"] == first}
        first_host = next(iter(placed)).split("//")[1].split(".")[0]
        assert two["sources"][0]["host"] == first_host
        assert "holder" in [s["host"] for s in two["sources"]]  # a fallback


def test_a_flagged_peer_is_left_out_until_its_base_is_gone(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, _clock):
        register(client, "holder", ram_mb=256, cache=HELD)
        register(client, "node-2", ram_mb=100_000)
        report = {"peer": "holder", "image_id": IMAGE, "reason": "leaf 3 does not match"}
        resp = client.post(
            "/internal/nodes/node-2/peer-reports", json=report, headers={"X-Auth-Token": NODE}
        )
        assert resp.status_code == 204
        sid = create(client).json()["server"]["id"]
        assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
        assert "sources" not in _spec_of(nodes, sid)
        # its base was quarantined (gone from its heartbeat), then fetched and verified again
        register(client, "holder", ram_mb=256, cache=[])
        sx = create(client, "vm-x").json()["server"]["id"]  # a dispatch looks at the flags
        assert wait_for(lambda: status_of(client, sx) == "ACTIVE")
        register(client, "holder", ram_mb=256, cache=HELD)
        register(client, "node-3", ram_mb=200_000)
        sid = create(client, "vm-y").json()["server"]["id"]
        assert wait_for(lambda: status_of(client, sid) == "ACTIVE")
        assert [s["host"] for s in _spec_of(nodes, sid)["sources"]] == ["holder"]


def test_peer_reports_are_checked(tmp_path: Path) -> None:
    with api(tmp_path) as (client, _nodes, _clock):
        register(client, "node-2")
        url = "/internal/nodes/node-2/peer-reports"
        good = {"peer": "holder", "image_id": IMAGE, "reason": "x"}
        assert client.post(url, json=good, headers=headers(ADMIN)).status_code in (401, 403)
        for bad in ({"peer": "", "image_id": IMAGE}, {"peer": "h", "image_id": "../x"}):
            resp = client.post(url, json=bad, headers={"X-Auth-Token": NODE})
            assert resp.status_code == 400, resp.text


def test_a_striped_plan_names_each_stripes_sources_and_stripe_zero_as_sources(
    tmp_path: Path,
) -> None:
    with api(tmp_path, peer_stripes=2, peer_stripe_fanout=2) as (client, nodes, _clock):
        nodes.build = lambda url, spec: (  # type: ignore[method-assign]
            nodes.builds.append((url, spec)) or {"uuid": spec["uuid"], "state": "BUILDING"}
        )
        register(client, "holder", ram_mb=256, cache=HELD)
        register(client, "node-2", ram_mb=512)
        register(client, "node-3", ram_mb=512)
        one = _spec_of(nodes, create(client, "vm1").json()["server"]["id"])
        two = _spec_of(nodes, create(client, "vm2").json()["server"]["id"])
        holder = {"host": "holder", "url": "http://holder.test:8775"}
        # the holder's two slots are shared by the stripes: the first node takes both,
        # and the second streams both stripes from the first (still fetching)
        assert one["stripes"] == [[holder], [holder]] and one["sources"] == [holder]
        first = next(url for url, spec in nodes.builds if spec is one).split("//")[1]
        first_host = first.split(".")[0]
        assert len(two["stripes"]) == 2
        assert all(chain and chain[0]["host"] == first_host for chain in two["stripes"])
        assert two["sources"] == two["stripes"][0]
