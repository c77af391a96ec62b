"""``cowfleet serve node`` as a real process (``none`` driver, bound to 127.0.0.2) against a
small real HTTP controller written here and the real embedded image service.

Tokens come from one shared tokens file: a member of project ``demo`` uploads the images
(private to its project), and the node, with its ``role = "node"`` token, reads them:
the same token the controller sends it and it sends the controller.
"""

from __future__ import annotations

import concurrent.futures
import json
import platform
import signal
import subprocess
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_program
from tests.fixtures.node_agent import AGENT_MEMBER_TOKEN as MEMBER_TOKEN
from tests.fixtures.node_agent import AGENT_NODE_TOKEN as NODE_TOKEN
from tests.fixtures.node_agent import AGENT_TOKENS as TOKENS
from tests.fixtures.node_agent import CountingProxy, FakeController, NodeAgent
from tests.fixtures.node_agent import private_file as _private

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MIB = 1024 * 1024
TINY = {"name": "t1.tiny", "vcpus": 1, "ram_mb": 256, "root_gb": 1, "ephemeral_gb": 0, "swap_mb": 0}


def _image(size: int, seed: int) -> bytes:
    data = bytearray(size)
    data[:16] = f"COWFLEET-NODE-{seed:02d}".encode()
    data[size // 2 : size // 2 + 4] = b"half"
    return bytes(data)


def _spec(image_id: str, name: str = "vm", uuid: str | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "uuid": uuid or str(uuid_mod.uuid4()),
        "name": name,
        "project_id": "demo",
        "image_id": image_id,
        "flavor": dict(TINY, **kw),
    }


def fleet_image_service(tmp_path: Path, factory: Any) -> Any:
    """The image service on the shared tokens file; uploads as the member."""
    svc = factory(tokens_file=_private(tmp_path / "tokens.toml", TOKENS))
    svc.token = MEMBER_TOKEN
    return svc


class Fleet:
    def __init__(self, tmp_path: Path, image_service: Any) -> None:
        self.service = image_service
        self.proxy = CountingProxy(image_service.url)
        self.controller = FakeController(NODE_TOKEN)
        self.agent = NodeAgent(
            tmp_path / "node-a",
            api_url=self.controller.url,
            image_url=self.proxy.url,
            token_file=_private(tmp_path / "node-token", NODE_TOKEN + "\n"),
        )

    def close(self) -> None:
        self.agent.stop()
        self.controller.close()
        self.proxy.close()


@pytest.fixture
def fleet(tmp_path: Path, image_service_factory: Any) -> Iterator[Fleet]:
    f = Fleet(tmp_path, fleet_image_service(tmp_path, image_service_factory))
    f.agent.start()
    yield f
    f.close()


def _folders(instances: Path) -> list[str]:
    return sorted(p.name for p in instances.iterdir() if len(p.name) == 36 and p.is_dir())


def _backing(disk: Path) -> dict[str, Any]:
    qemu_img = require_program("qemu-img")
    out = subprocess.run(
        [qemu_img, "info", "-f", "qcow2", "--output", "json", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    )
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def test_registers_and_heartbeats_capacity_and_cache(fleet: Fleet) -> None:
    hb = fleet.controller.wait_heartbeat()
    assert hb["hostname"] == "node-a" and hb["url"] == fleet.agent.url
    assert (hb["hypervisor_type"], hb["vcpus"], hb["ram_mb"], hb["disk_gb"]) == (
        "none",
        4,
        8192,
        50,
    )
    assert isinstance(hb["disk_free_gb"], int) and hb["cache"] == [] and hb["instances"] == []
    assert hb["arch"] == platform.machine().lower()
    # private to project demo: the node's token reads it anyway (a node token reads all)
    iid = fleet.service.upload("cirros", _image(4 * MIB, 1), visibility="private")
    spec = _spec(iid)
    assert fleet.agent.request("PUT", f"/v1/servers/{spec['uuid']}", json=spec).status_code == 202
    fleet.agent.wait_state(spec["uuid"], "ACTIVE")
    hb = fleet.controller.wait_heartbeat(lambda b: bool(b["cache"] and b["instances"]))
    assert hb["cache"] == [
        {
            "image_id": iid,
            "verified": True,
            "bytes": hb["cache"][0]["bytes"],
            "state": "verified",
            "name": "cirros",
        }
    ]
    assert hb["instances"] == [
        {
            "uuid": spec["uuid"],
            "state": "ACTIVE",
            "power_state": 1,
            "fault": None,
            "name": "vm",
            "image_id": iid,
        }
    ]
    status = fleet.agent.request("GET", "/v1/status").json()
    assert status["hostname"] == "node-a" and status["instances"] == hb["instances"]


def test_same_build_twice_is_one_instance_on_base_overlays(fleet: Fleet) -> None:
    iid = fleet.service.upload("img", _image(4 * MIB, 2))
    spec = _spec(iid, name="web")
    uuid = spec["uuid"]
    first = fleet.agent.request("PUT", f"/v1/servers/{uuid}", json=spec)
    second = fleet.agent.request("PUT", f"/v1/servers/{uuid}", json=spec)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["uuid"] == second.json()["uuid"] == uuid
    view = fleet.agent.wait_state(uuid, "ACTIVE")
    assert view["name"] == "web" and view["power_state"] == 1
    # after it is built, the same spec again is still harmless
    assert fleet.agent.request("PUT", f"/v1/servers/{uuid}", json=spec).status_code == 202
    assert _folders(fleet.agent.instances) == [uuid]
    info = _backing(fleet.agent.instances / uuid / "disk")
    base = fleet.agent.instances / "_base"
    assert Path(info["full-backing-filename"]).parent == base
    assert info["virtual-size"] == 1024**3
    record = json.loads((fleet.agent.instances / uuid / "instance.json").read_text())
    assert record["spec"]["name"] == "web" and record["uuid"] == uuid
    # a different spec for that uuid: 409, nothing changes
    other = dict(spec, image_id=str(uuid_mod.uuid4()))
    resp = fleet.agent.request("PUT", f"/v1/servers/{uuid}", json=other)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == 409
    assert _folders(fleet.agent.instances) == [uuid]
    deadline = time.monotonic() + 10
    while fleet.controller.events_for(uuid)[-1:] != ["ACTIVE"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fleet.controller.events_for(uuid) == ["BUILDING", "ACTIVE"]
    listed = fleet.agent.request("GET", "/v1/servers").json()["servers"]
    assert [s["uuid"] for s in listed] == [uuid]


def test_twenty_concurrent_builds_one_download(fleet: Fleet) -> None:
    iid = fleet.service.upload("herd", _image(48 * MIB, 3))
    specs = [_spec(iid, name=f"herd-{i}") for i in range(20)]

    def put(spec: dict[str, Any]) -> int:
        return fleet.agent.request("PUT", f"/v1/servers/{spec['uuid']}", json=spec).status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert list(pool.map(put, specs)) == [202] * 20
    for spec in specs:
        fleet.agent.wait_state(spec["uuid"], "ACTIVE", timeout=120)
    assert fleet.proxy.count(iid) == 1
    assert _folders(fleet.agent.instances) == sorted(s["uuid"] for s in specs)
    assert [p.name for p in (fleet.agent.instances / "_base").iterdir() if len(p.name) == 40]


def test_stop_start_reboot_delete(fleet: Fleet) -> None:
    iid = fleet.service.upload("life", _image(4 * MIB, 4))
    spec = _spec(iid)
    uuid = spec["uuid"]
    agent = fleet.agent
    agent.request("PUT", f"/v1/servers/{uuid}", json=spec)
    agent.wait_state(uuid, "ACTIVE")

    def act(action: str, **kw: Any) -> int:
        body = {"action": action, **kw}
        return agent.request("POST", f"/v1/servers/{uuid}/action", json=body).status_code

    assert act("start") == 409  # already ACTIVE
    assert act("stop") == 202
    view = agent.wait_state(uuid, "SHUTOFF")
    assert view["power_state"] == 4
    assert act("stop") == 409 and act("reboot", type="SOFT") == 409
    assert act("start") == 202
    agent.wait_state(uuid, "ACTIVE")
    assert act("reboot", type="HARD") == 202
    agent.wait_state(uuid, "ACTIVE")
    assert act("explode") == 400
    missing = str(uuid_mod.uuid4())
    resp = agent.request("POST", f"/v1/servers/{missing}/action", json={"action": "stop"})
    assert resp.status_code == 404
    assert agent.request("DELETE", f"/v1/servers/{uuid}").status_code == 202
    agent.wait_state(uuid, "ABSENT")
    assert _folders(agent.instances) == []
    assert agent.request("DELETE", f"/v1/servers/{uuid}").status_code == 204
    assert agent.request("GET", f"/v1/servers/{uuid}").status_code == 404
    deadline = time.monotonic() + 10
    while "DELETED" not in fleet.controller.events_for(uuid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fleet.controller.events_for(uuid)[-2:] == ["DELETING", "DELETED"]
    hb = fleet.controller.wait_heartbeat()
    assert hb["instances"] == [] and hb["cache"][0]["image_id"] == iid  # the base stays


def test_failed_build_ends_error_and_the_agent_goes_on(fleet: Fleet) -> None:
    spec = _spec(str(uuid_mod.uuid4()))  # no such image
    uuid = spec["uuid"]
    assert fleet.agent.request("PUT", f"/v1/servers/{uuid}", json=spec).status_code == 202
    view = fleet.agent.wait_state(uuid, "ERROR")
    assert view["fault"] and "\n" not in view["fault"]
    assert _folders(fleet.agent.instances) == []
    hb = fleet.controller.wait_heartbeat(lambda b: bool(b["instances"]))
    assert hb["instances"][0]["state"] == "ERROR"
    iid = fleet.service.upload("ok", _image(4 * MIB, 5))
    good = _spec(iid)
    fleet.agent.request("PUT", f"/v1/servers/{good['uuid']}", json=good)
    fleet.agent.wait_state(good["uuid"], "ACTIVE")
    assert fleet.agent.request("DELETE", f"/v1/servers/{uuid}").status_code == 202
    fleet.agent.wait_state(uuid, "ABSENT")
    bad = fleet.agent.request("PUT", f"/v1/servers/{uuid}", json={"uuid": uuid})
    assert bad.status_code == 400


def test_restart_reports_the_same_instances(fleet: Fleet) -> None:
    iid = fleet.service.upload("keep", _image(4 * MIB, 6))
    specs = [_spec(iid, name=f"keep-{i}") for i in range(3)]
    for spec in specs:
        fleet.agent.request("PUT", f"/v1/servers/{spec['uuid']}", json=spec)
    for spec in specs:
        fleet.agent.wait_state(spec["uuid"], "ACTIVE")
    stop = {"action": "stop"}
    fleet.agent.request("POST", f"/v1/servers/{specs[0]['uuid']}/action", json=stop)
    fleet.agent.wait_state(specs[0]["uuid"], "SHUTOFF")
    assert fleet.agent.stop() == 0  # SIGTERM: a clean exit
    fleet.agent.start()
    want = sorted(s["uuid"] for s in specs)
    hb = fleet.controller.wait_heartbeat(lambda b: len(b["instances"]) == 3)
    assert sorted(i["uuid"] for i in hb["instances"]) == want
    states = {i["uuid"]: i["state"] for i in hb["instances"]}
    assert states[specs[0]["uuid"]] == "SHUTOFF"
    assert {states[s["uuid"]] for s in specs[1:]} == {"ACTIVE"}
    assert {i["name"] for i in hb["instances"]} == {"keep-0", "keep-1", "keep-2"}
    for spec in specs:  # the controller repeating itself makes nothing new
        resp = fleet.agent.request("PUT", f"/v1/servers/{spec['uuid']}", json=spec)
        assert resp.status_code == 202
    assert _folders(fleet.agent.instances) == want
    assert fleet.proxy.count(iid) == 1


def test_bad_or_missing_token_is_401(fleet: Fleet) -> None:
    agent = fleet.agent
    uuid = str(uuid_mod.uuid4())
    for method, path in (
        ("GET", "/v1/status"),
        ("GET", "/v1/servers"),
        ("GET", f"/v1/servers/{uuid}"),
        ("PUT", f"/v1/servers/{uuid}"),
        ("DELETE", f"/v1/servers/{uuid}"),
        ("POST", f"/v1/servers/{uuid}/action"),
    ):
        for token in ("wrong", "", MEMBER_TOKEN):  # a user's token is no node token
            resp = agent.request(method, path, token=token, json=_spec("x", uuid=uuid))
            assert resp.status_code == 401, (method, path, token)
            assert resp.json()["error"]["code"] == 401
    assert _folders(agent.instances) == []


def test_api_down_then_up_the_agent_keeps_trying(
    tmp_path: Path, image_service_factory: Any
) -> None:
    f = Fleet(tmp_path, fleet_image_service(tmp_path, image_service_factory))
    f.controller.close()  # nobody listens at the API URL yet
    f.agent.start()
    try:
        time.sleep(1.5)
        assert f.agent.proc is not None and f.agent.proc.poll() is None
        port = int(f.agent.api_url.rsplit(":", 1)[1])
        ctl = FakeController(NODE_TOKEN, port=port)
        try:
            hb = ctl.wait_heartbeat(timeout=30)
            assert hb["hostname"] == "node-a"
        finally:
            ctl.close()
    finally:
        f.agent.stop()
        f.proxy.close()


def test_sigterm_during_builds_exits_cleanly(fleet: Fleet) -> None:
    fleet.agent.stop()  # one build at a time: most of the twelve are still queued at SIGTERM
    fleet.agent.extra_env["COWFLEET_NODE_BUILD_WORKERS"] = "1"
    fleet.agent.start()
    iid = fleet.service.upload("late", _image(32 * MIB, 7))
    specs = [_spec(iid, name=f"late-{i}") for i in range(12)]
    for spec in specs:
        fleet.agent.request("PUT", f"/v1/servers/{spec['uuid']}", json=spec)
    proc = fleet.agent.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    fleet.agent.proc = None
    built = set(_folders(fleet.agent.instances))
    # nothing half-made: every folder is a finished instance, and no .tmp is left
    assert not [p for p in fleet.agent.instances.iterdir() if p.name.endswith(".tmp")]
    for uuid in built:
        assert (fleet.agent.instances / uuid / "instance.json").is_file()
    # builds that never began were reported failed (event or the last heartbeat)
    last = fleet.controller.last()
    assert last is not None
    reported = {i["uuid"]: i["state"] for i in last["instances"]}
    assert len(built) < len(specs)
    for spec in specs:
        if spec["uuid"] not in built:
            assert reported.get(spec["uuid"]) == "ERROR"
    errors = [e for e in fleet.controller.events if e["state"] == "ERROR"]
    assert errors and all("stopped before the build began" in e["fault"] for e in errors)
