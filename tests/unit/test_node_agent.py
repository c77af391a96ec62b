"""The node agent's parts with fakes: build spec, builds (idempotency, state machine,
shutdown), inventory, the heartbeat loop (injected clock, fake API) and its HTTP API."""

from __future__ import annotations

import os
import threading
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cowfleet import config
from cowfleet.compute.drivers.base import DomainInfo
from cowfleet.compute.drivers.none import NoneDriver
from cowfleet.compute.manager import ServerManager
from cowfleet.compute.provision import Provisioner
from cowfleet.compute.state import ServerRow
from cowfleet.errors import BackendUnavailableError, ConflictError, NotFoundError, ValidationError
from cowfleet.node import inventory
from cowfleet.node.agent import MAX_BACKOFF, EventSender, Heartbeat
from cowfleet.node.app import create_app
from cowfleet.node.builds import Builds
from cowfleet.node.spec import BuildSpec, InstanceView
from tests.unit.test_provision import IMAGE_ID, FakeCache, FakeImage, FakeImages, _no_lock

TOKEN = "node-secret-token"
FLAVOR = {"name": "t1.tiny", "vcpus": 1, "ram_mb": 256, "root_gb": 1}


def spec(uuid: str | None = None, image_id: str = IMAGE_ID, **kw: Any) -> BuildSpec:
    body = {
        "uuid": uuid or str(uuid_mod.uuid4()),
        "name": "vm",
        "project_id": "p1",
        "image_id": image_id,
        "flavor": dict(FLAVOR, **kw),
    }
    return BuildSpec.from_json(body)


class GatedCache(FakeCache):
    """The fake cache; ``ensure_cached`` waits for ``gate`` (builds held in flight)."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def ensure_cached(self, image_id: str) -> Any:
        assert self.gate.wait(10)
        with self.lock:
            return super().ensure_cached(image_id)


class Node:
    def __init__(self, tmp_path: Path, workers: int = 4) -> None:
        self.cfg = config.load(
            None,
            env={"COWFLEET_HOME": str(tmp_path / "home"), "COWFLEET_DRIVER": "none"},
        )
        self.cache = GatedCache(self.cfg.base_dir)
        self.images = FakeImages(FakeImage(IMAGE_ID))
        self.driver = NoneDriver()
        self.prov = Provisioner(
            self.cfg,
            images=self.images,
            cache=self.cache,
            driver=self.driver,
            lock=_no_lock,
            durable=False,
        )
        self.events: list[InstanceView] = []
        self.builds = Builds(
            self.cfg.instances_path,
            provisioner=self.prov,
            manager=ServerManager(self.cfg, drivers=lambda _n: self.driver),
            driver=self.driver,
            notify=self.events.append,
            workers=workers,
        )

    def folders(self) -> list[str]:
        path = self.cfg.instances_path
        return sorted(p.name for p in path.iterdir() if len(p.name) == 36) if path.exists() else []

    def wait(self, uuid: str, state: str) -> InstanceView:
        for _ in range(400):
            try:
                view = self.builds.get(uuid)
            except NotFoundError:
                if state == "ABSENT":
                    return InstanceView(uuid, "ABSENT")
                view = None
            if view is not None and view.state == state:
                return view
            threading.Event().wait(0.01)
        raise AssertionError(f"{uuid} never {state}: {self.builds.list()}")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.cache.gate.set()
    n.builds.close()


# -- build spec ------------------------------------------------------------------
def test_spec_validation_names_the_problem() -> None:
    good = spec().to_dict()
    assert BuildSpec.from_json(good, good["uuid"]) == BuildSpec.from_json(good)
    for bad, word in (
        ([], "object"),
        (dict(good, uuid="nope"), "uuid"),
        (dict(good, name=""), "name"),
        (dict(good, name="x" * 256), "name"),
        (dict(good, image_id=None), "image_id"),
        (dict(good, flavor=dict(FLAVOR, vcpus=0)), "vcpus"),
        (dict(good, flavor=dict(FLAVOR, ram_mb=True)), "ram_mb"),
        (dict(good, flavor="m1.tiny"), "flavor"),
    ):
        with pytest.raises(ValidationError, match=word):
            BuildSpec.from_json(bad)
    with pytest.raises(ValidationError, match="URL"):
        BuildSpec.from_json(good, str(uuid_mod.uuid4()))


# -- builds ------------------------------------------------------------------------
def test_same_spec_twice_builds_once(node: Node) -> None:
    node.cache.gate.clear()
    s = spec()
    first = node.builds.put(s)
    second = node.builds.put(s)  # while building
    assert first.state == second.state == "BUILDING"
    node.cache.gate.set()
    view = node.wait(s.uuid, "ACTIVE")
    assert view.name == "vm" and view.power_state == 1
    assert node.builds.put(s).state == "ACTIVE"  # after it is built
    assert node.folders() == [s.uuid]
    assert node.cache.calls == [IMAGE_ID]
    assert [e.state for e in node.events] == ["BUILDING", "ACTIVE"]


def test_different_spec_for_an_existing_uuid_conflicts(node: Node) -> None:
    node.cache.gate.clear()
    s = spec()
    node.builds.put(s)
    with pytest.raises(ConflictError):
        node.builds.put(spec(s.uuid, vcpus=2))  # while building
    node.cache.gate.set()
    node.wait(s.uuid, "ACTIVE")
    with pytest.raises(ConflictError):
        node.builds.put(spec(s.uuid, vcpus=2))  # on disk: compared with instance.json
    assert node.folders() == [s.uuid]


def test_a_restarted_node_reads_its_instances_from_disk(node: Node, tmp_path: Path) -> None:
    s = spec()
    node.builds.put(s)
    node.wait(s.uuid, "ACTIVE")
    node.builds.action(s.uuid, "stop")
    node.wait(s.uuid, "SHUTOFF")
    node.builds.close()
    again = Node(tmp_path)
    try:
        assert [(v.uuid, v.state, v.name) for v in again.builds.list()] == [
            (s.uuid, "SHUTOFF", "vm")
        ]
        assert again.builds.put(s).state == "SHUTOFF"
        assert again.folders() == [s.uuid]
    finally:
        again.builds.close()


def test_power_state_machine(node: Node) -> None:
    s = spec()
    node.builds.put(s)
    node.wait(s.uuid, "ACTIVE")
    with pytest.raises(ConflictError):
        node.builds.action(s.uuid, "start")
    with pytest.raises(ValidationError):
        node.builds.action(s.uuid, "pause")
    with pytest.raises(ValidationError):
        node.builds.action(s.uuid, "reboot", "WARM")
    node.builds.action(s.uuid, "stop")
    assert node.wait(s.uuid, "SHUTOFF").power_state == 4
    for action, kind in (("stop", "SOFT"), ("reboot", "SOFT")):
        with pytest.raises(ConflictError):
            node.builds.action(s.uuid, action, kind)
    node.builds.action(s.uuid, "reboot", "HARD")  # HARD reboot powers a stopped server on
    node.wait(s.uuid, "ACTIVE")
    with pytest.raises(NotFoundError):
        node.builds.action(str(uuid_mod.uuid4()), "stop")


def test_no_action_while_building(node: Node) -> None:
    node.cache.gate.clear()
    s = spec()
    node.builds.put(s)
    with pytest.raises(ConflictError):
        node.builds.action(s.uuid, "stop")
    node.cache.gate.set()
    node.wait(s.uuid, "ACTIVE")


def test_failed_build_is_error_with_a_fault_and_leaves_nothing(node: Node) -> None:
    s = spec(image_id=str(uuid_mod.uuid4()))
    node.builds.put(s)
    view = node.wait(s.uuid, "ERROR")
    assert view.fault and "not found" in view.fault and "\n" not in view.fault
    assert node.folders() == []
    assert node.builds.put(s).state == "ERROR"  # the same spec again: no second try here
    assert node.builds.delete(s.uuid) is True
    node.wait(s.uuid, "ABSENT")
    assert node.events[-1].state == "DELETED"


def test_unexpected_error_in_a_build_is_contained(node: Node) -> None:
    def boom(_image_id: str) -> Any:
        raise RuntimeError("disk on fire")

    node.cache.ensure_cached = boom  # type: ignore[method-assign]
    s = spec()
    node.builds.put(s)
    assert "RuntimeError: disk on fire" in (node.wait(s.uuid, "ERROR").fault or "")
    node.cache.ensure_cached = GatedCache.ensure_cached.__get__(node.cache)  # type: ignore[method-assign]
    ok = spec()
    node.builds.put(ok)
    node.wait(ok.uuid, "ACTIVE")


def test_delete_while_building_deletes_after_the_build(node: Node) -> None:
    node.cache.gate.clear()
    s = spec()
    node.builds.put(s)
    assert node.builds.delete(s.uuid) is True
    assert node.builds.get(s.uuid).state == "DELETING"
    node.cache.gate.set()
    node.wait(s.uuid, "ABSENT")
    assert node.folders() == []
    assert node.builds.delete(s.uuid) is False
    assert [e.state for e in node.events][-1] == "DELETED"


def test_close_records_queued_builds_as_failed(tmp_path: Path) -> None:
    n = Node(tmp_path, workers=1)
    n.cache.gate.clear()
    first, queued = spec(), spec()
    n.builds.put(first)
    n.builds.put(queued)
    closer = threading.Thread(target=n.builds.close)
    closer.start()
    threading.Event().wait(0.1)
    n.cache.gate.set()  # the running build finishes
    closer.join(10)
    assert not closer.is_alive()
    assert n.folders() == [first.uuid]
    view = n.builds.get(queued.uuid)
    assert view.state == "ERROR" and "stopped before the build began" in (view.fault or "")
    with pytest.raises(BackendUnavailableError):
        n.builds.put(spec())


# -- inventory -----------------------------------------------------------------------
class FakeStatvfs:
    f_blocks = 100 * 1024  # 100 GiB of 1 MiB blocks
    f_bavail = 40 * 1024
    f_frsize = 1024 * 1024


def test_capacity_from_the_host_or_the_settings(tmp_path: Path) -> None:
    def statvfs(_p: Path) -> Any:
        return FakeStatvfs()

    base = {"COWFLEET_HOME": str(tmp_path)}
    cfg = config.load(None, env=base)
    cap = inventory.capacity(cfg, cpu_count=lambda: 16, ram_mb=lambda: 64000, statvfs=statvfs)
    assert cap == inventory.Capacity(16, 64000, 100)
    cfg = config.load(
        None,
        env=dict(
            base, COWFLEET_NODE_VCPUS="4", COWFLEET_NODE_RAM_MB="2048", COWFLEET_NODE_DISK_GB="9"
        ),
    )
    cap = inventory.capacity(cfg, cpu_count=lambda: 16, ram_mb=lambda: 64000, statvfs=statvfs)
    assert cap == inventory.Capacity(4, 2048, 9)
    assert inventory.disk_free_gb(tmp_path / "not" / "yet", statvfs=statvfs) == 40


def test_host_arch_uses_image_names() -> None:
    assert inventory.host_arch(lambda: "AMD64") == "x86_64"
    assert inventory.host_arch(lambda: "arm64") == "aarch64"
    assert inventory.host_arch(lambda: "x86_64") == "x86_64"
    assert inventory.host_arch(lambda: "") is None


def test_cache_inventory_skips_what_is_not_an_image_base(node: Node) -> None:
    assert inventory.cache_inventory(node.cfg.instances_path) == []
    s = spec()
    node.builds.put(s)
    node.wait(s.uuid, "ACTIVE")
    # the fake cache writes no metadata: a base without it is "foreign", not an image base
    assert inventory.cache_inventory(node.cfg.instances_path) == []


@pytest.mark.parametrize(
    ("libvirt_state", "state", "power"),
    [
        ("running", "ACTIVE", 1),
        ("paused", "ACTIVE", 3),
        ("shut off", "SHUTOFF", 4),
        ("crashed", "SHUTOFF", 6),
        ("missing-domain", "ERROR", 0),
        ("broken-folder", "ERROR", 0),
        ("incomplete", "ERROR", 0),
    ],
)
def test_libvirt_states_map_to_node_states(libvirt_state: str, state: str, power: int) -> None:
    row = ServerRow(
        "6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2b09", "n", None, libvirt_state, None, None, None,
        "libvirt", problem="why",
    )  # fmt: skip
    view = inventory.view_of(row, None)
    assert (view.state, view.power_state) == (state, power)
    assert (view.fault is not None) == (state == "ERROR")


def test_one_instance_is_read_alone(node: Node) -> None:
    path = node.cfg.instances_path
    s = spec()
    node.builds.put(s)
    node.wait(s.uuid, "ACTIVE")
    assert inventory.instance_view(path, s.uuid, None) == node.builds.get(s.uuid)
    half = str(uuid_mod.uuid4())
    (path / f".{half}.tmp").mkdir()
    broken = str(uuid_mod.uuid4())
    (path / broken).mkdir()
    (path / broken / "instance.json").write_text("{not json")
    for uuid, word in ((half, "interrupted"), (broken, "broken")):
        view = node.builds.get(uuid)
        assert view.state == "ERROR" and word in (view.fault or "")
        assert view == {v.uuid: v for v in node.builds.list()}[uuid]
    assert inventory.instance_view(path, str(uuid_mod.uuid4()), None) is None


def test_orphan_domains_are_reported(tmp_path: Path) -> None:
    from cowfleet.compute.domain_xml import DomainMetadata

    uuid = str(uuid_mod.uuid4())
    meta = DomainMetadata(instances_path=str(tmp_path), image_id=IMAGE_ID, flavor="m1.tiny")
    dom = DomainInfo(uuid, "instance-x", 3, "running", True, meta)
    views = inventory.instance_views(tmp_path, [dom])
    assert views[uuid].state == "ERROR" and "folder is gone" in (views[uuid].fault or "")


# -- heartbeat loop --------------------------------------------------------------------
class FakeAPI:
    def __init__(self, script: list[Any]) -> None:
        self.script = script  # per call: an answer dict, or an exception to raise
        self.bodies: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        step = self.script.pop(0) if self.script else {"heartbeat_interval": 10}
        if isinstance(step, BaseException):
            raise step
        return dict(step)

    def event(self, body: dict[str, Any]) -> None:
        self.events.append(body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wait_until(self, stop: threading.Event, calls: int) -> Any:
        def wait(seconds: float) -> bool:
            self.waits.append(seconds)
            self.now += seconds
            if len(self.waits) >= calls:
                stop.set()
            return stop.is_set()

        return wait


def test_heartbeat_backs_off_while_the_api_is_down_then_follows_its_interval() -> None:
    down = BackendUnavailableError("connection refused")
    api = FakeAPI(
        [down] * 8
        + [
            {"node_id": "n1", "heartbeat_interval": 5},
            RuntimeError("bug"),
            {"heartbeat_interval": 7},
        ]
    )
    clock = Clock()
    status_calls = []

    def status() -> dict[str, Any]:
        status_calls.append(1)
        clock.now += 0.5  # building the status takes time: the wait accounts for it
        return {"hostname": "n"}

    hb = Heartbeat(api, status, monotonic=clock.monotonic)
    stop = threading.Event()
    hb.run(stop, wait=clock.wait_until(stop, 11))
    assert clock.waits[:8] == [1, 2, 4, 8, 16, 32, MAX_BACKOFF, MAX_BACKOFF]
    assert clock.waits[8] == 4.5  # interval 5 from the answer, minus the 0.5 s spent
    assert clock.waits[9] == 1  # an unexpected error: logged, backed off, goes on
    assert clock.waits[10] == 6.5
    assert hb.node_id == "n1" and hb.sent == 2 and hb.failures == 0
    assert len(api.bodies) == len(status_calls) == 11


def test_heartbeat_ignores_a_nonsense_interval() -> None:
    api = FakeAPI([{"heartbeat_interval": "soon"}, {"heartbeat_interval": -3}])
    clock = Clock()
    hb = Heartbeat(api, dict, monotonic=clock.monotonic, interval=10)
    assert hb.beat() == 10
    assert hb.beat() == 0.05


def test_event_sender_drains_and_never_raises() -> None:
    class Flaky(FakeAPI):
        def event(self, body: dict[str, Any]) -> None:
            if body["state"] == "ERROR":
                raise BackendUnavailableError("down")
            super().event(body)

    api = Flaky([])
    sender = EventSender(api)
    sender.start()
    for state in ("BUILDING", "ERROR", "ACTIVE"):
        sender.post(InstanceView("u", state))
    sender.close()
    assert [e["state"] for e in api.events] == ["BUILDING", "ACTIVE"]
    assert sender.dropped == 1


# -- HTTP API ------------------------------------------------------------------------
@pytest.fixture
def client(node: Node) -> TestClient:
    app = create_app(node.builds, lambda: {"hostname": "n", "instances": []}, TOKEN)
    return TestClient(app, headers={"X-Auth-Token": TOKEN})


def test_api_token_is_required(client: TestClient) -> None:
    for headers in ({"X-Auth-Token": "nope"}, {"X-Auth-Token": ""}, {"X-Auth-Token": TOKEN[:-1]}):
        resp = client.get("/v1/status", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == 401
    assert client.get("/v1/status").json()["hostname"] == "n"


def test_api_routes(client: TestClient, node: Node) -> None:
    s = spec()
    body = s.to_dict()
    url = f"/v1/servers/{s.uuid}"
    assert client.put(url, json=body).status_code == 202
    assert client.put(url, json=body).status_code == 202
    node.wait(s.uuid, "ACTIVE")
    assert client.get(url).json()["state"] == "ACTIVE"
    assert [v["uuid"] for v in client.get("/v1/servers").json()["servers"]] == [s.uuid]
    other = dict(body, flavor=dict(FLAVOR, ram_mb=512))
    assert client.put(url, json=other).json() == {
        "error": {"code": 409, "message": f"server {s.uuid} exists on this node with a "
                  "different build spec"}
    }  # fmt: skip
    assert client.put(url, content=b"{not json").status_code == 400
    assert client.put("/v1/servers/not-a-uuid", json=body).status_code == 400
    assert client.put(url, content=b" " * (65 * 1024)).status_code == 413
    act = f"{url}/action"
    assert client.post(act, json={"action": "start"}).status_code == 409
    assert client.post(act, json={"action": "stop"}).status_code == 202
    node.wait(s.uuid, "SHUTOFF")
    assert client.post(act, json={}).status_code == 400
    assert client.delete(url).status_code == 202
    node.wait(s.uuid, "ABSENT")
    assert client.delete(url).status_code == 204
    assert client.get(url).status_code == 404
    assert client.get("/v1/nothing").json()["error"]["code"] == 404
    assert node.folders() == []
    assert not os.path.exists(node.cfg.instances_path / s.uuid)


# -- the command ---------------------------------------------------------------------
def _run_cli(tmp_path: Path, *args: str) -> int:
    from cowfleet.cli.main import main

    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("COWFLEET_")]:
            mp.delenv(k)
        mp.setenv("COWFLEET_HOME", str(tmp_path / "home"))
        return main(["serve", "node", *args])


def test_serve_node_needs_its_urls_and_a_private_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o600)
    urls = ("--api-url", "http://127.0.0.1:1", "--image-url", "http://127.0.0.1:2")
    assert _run_cli(tmp_path, "--token-file", str(token)) == 2
    err = capsys.readouterr().err
    assert "--api-url" in err and "--image-url" in err
    token.chmod(0o644)
    assert _run_cli(tmp_path, *urls, "--token-file", str(token)) == 2
    assert "chmod 600" in capsys.readouterr().err
    assert _run_cli(tmp_path, *urls, "--token-file", str(tmp_path / "none")) == 2
    assert "not found" in capsys.readouterr().err
    token.chmod(0o600)
    bad = ("--token-file", str(token), "--hostname", "no spaces allowed")
    assert _run_cli(tmp_path, *urls, *bad) == 2
    assert "hostname" in capsys.readouterr().err
    assert _run_cli(tmp_path, *urls, "--token-file", str(token), "--port", "0") == 2
    assert "--port" in capsys.readouterr().err


# -- shared image lookups ------------------------------------------------------------
def test_concurrent_lookups_of_one_image_share_one_request() -> None:
    from cowfleet.node.lookup import SharedLookups

    gate = threading.Event()
    calls: list[str] = []

    class Slow(FakeImages):
        def find(self, name_or_id: str) -> FakeImage:
            calls.append(name_or_id)
            assert gate.wait(5)
            return super().find(name_or_id)

    shared = SharedLookups(Slow(FakeImage(IMAGE_ID)))
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(shared.find(IMAGE_ID))) for _ in range(10)
    ]
    for t in threads:
        t.start()
    threading.Event().wait(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(results) == 10 and {r.id for r in results} == {IMAGE_ID}
    assert calls == [IMAGE_ID]
    shared.find(IMAGE_ID)  # nothing is kept once the request returned
    assert calls == [IMAGE_ID, IMAGE_ID]
    with pytest.raises(NotFoundError):  # errors reach every waiter, and are not kept
        shared.get("6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2bff")
