"""``createImage`` in the compute API: answers, Nova's conflicts, the image's properties,
the node job followed to its end (fake image service and node agents)."""

from __future__ import annotations

import threading
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cowfleet.api import snapshots
from cowfleet.api.app import create_app
from cowfleet.api.settings import ApiSettings
from tests.unit._api_fakes import (
    ADMIN,
    IMAGE,
    MEMBER_A,
    MEMBER_B,
    TOKENS,
    Clock,
    FakeImages,
    FakeNodes,
    create,
    headers,
    register,
    status_of,
    wait_for,
)


class SnapImages(FakeImages):
    def __init__(self) -> None:
        super().__init__()
        self.created: dict[str, tuple[dict[str, Any], str]] = {}
        self.deleted: list[str] = []

    def doc(self, image_id: str, token: str) -> dict[str, Any] | None:
        return {
            "id": image_id,
            "min_disk": 3,
            "min_ram": 256,
            "kernel_id": "k-1",
            "ramdisk_id": "r-1",
            "os_command_line": "console=ttyS0",
            "hw_disk_bus": "virtio",
            "checksum": "not inherited",
        }

    def create_image(self, body: dict[str, Any], token: str) -> dict[str, Any]:
        image_id = str(uuidlib.uuid4())
        self.created[image_id] = (body, token)
        return {"id": image_id, "status": "queued", **body}

    def delete_image(self, image_id: str, token: str) -> bool:
        self.deleted.append(image_id)
        return True


class SnapNodes(FakeNodes):
    """Builds of servers named ``slow*`` stay BUILDING; snapshots run until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.outcome = "done"
        self.snapshots: list[tuple[str, str, str]] = []

    def build(self, node_url: str, spec: dict[str, Any]) -> dict[str, Any]:
        doc = super().build(node_url, spec)
        if str(spec.get("name", "")).startswith("slow"):
            doc["state"] = "BUILDING"
        return doc

    def snapshot(self, node_url: str, uuid: str, image_id: str, token: str) -> dict[str, Any]:
        self.snapshots.append((uuid, image_id, token))
        return {"uuid": uuid, "image_id": image_id, "state": "running"}

    def snapshot_status(self, node_url: str, uuid: str) -> dict[str, Any] | None:
        (_, image_id, _) = next(s for s in reversed(self.snapshots) if s[0] == uuid)
        state = self.outcome if self.release.is_set() else "running"
        return {"uuid": uuid, "image_id": image_id, "state": state}


@pytest.fixture
def env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, SnapImages, SnapNodes]]:
    monkeypatch.setattr(snapshots, "POLL", 0.01)
    images, nodes = SnapImages(), SnapNodes()
    cfg = ApiSettings(
        database_url=f"sqlite:///{tmp_path / 'compute.sqlite'}",
        tokens_file=tmp_path / "tokens.toml",
        image_url="http://127.0.0.1:9",
    )
    app = create_app(cfg, TOKENS, sweep=False, images=images, nodes=nodes, clock=Clock())
    with TestClient(app) as client:
        register(client, "node-1")
        yield client, images, nodes


def _server(client: TestClient, name: str = "vm", token: str = ADMIN) -> str:
    sid = str(create(client, name, token).json()["server"]["id"])
    wait_for(lambda: status_of(client, sid, token) == "ACTIVE")
    return sid


def _snap(
    client: TestClient, sid: str, token: str = ADMIN, version: str = "2.45", **body: Any
) -> Any:
    return client.post(
        f"/v2.1/servers/{sid}/action",
        json={"createImage": {"name": "snap1", **body}},
        headers=headers(token, version),
    )


def _task(client: TestClient, sid: str) -> Any:
    doc = client.get(f"/v2.1/servers/{sid}", headers=headers()).json()["server"]
    return doc["OS-EXT-STS:task_state"]


def test_create_image_answers_the_id_and_sets_novas_properties(env: Any) -> None:
    client, images, nodes = env
    sid = _server(client, token=MEMBER_A)
    resp = _snap(client, sid, MEMBER_A, metadata={"purpose": "backup"})
    assert resp.status_code == 202, resp.text
    image_id = resp.json()["image_id"]
    body, token = images.created[image_id]
    assert token == MEMBER_A  # the image is made (and later uploaded) as the caller
    assert body["name"] == "snap1" and body["purpose"] == "backup"
    assert (body["image_type"], body["instance_uuid"], body["base_image_ref"]) == (
        "snapshot",
        sid,
        IMAGE,
    )
    assert body["owner"] == "alpha"
    assert (body["kernel_id"], body["ramdisk_id"], body["os_command_line"]) == (
        "k-1",
        "r-1",
        "console=ttyS0",
    )
    assert (body["min_disk"], body["min_ram"], body["hw_disk_bus"]) == (3, 256, "virtio")
    assert "checksum" not in body
    wait_for(lambda: nodes.snapshots)
    assert nodes.snapshots[0] == (sid, image_id, MEMBER_A)
    # a second snapshot while this one runs: 409
    assert _task(client, sid) in ("image_snapshot", "image_uploading")
    second = _snap(client, sid, MEMBER_A)
    assert second.status_code == 409 and "task_state image_" in second.text
    nodes.release.set()
    wait_for(lambda: _task(client, sid) is None)
    assert images.deleted == []
    assert status_of(client, sid) == "ACTIVE"


def test_before_245_the_answer_is_a_location(env: Any) -> None:
    client, images, nodes = env
    nodes.release.set()
    sid = _server(client)
    resp = _snap(client, sid, version="2.44")
    assert resp.status_code == 202 and resp.content == b""
    (image_id,) = images.created
    assert resp.headers["location"] == f"http://127.0.0.1:9/v2/images/{image_id}"


def test_a_failed_node_job_deletes_the_image(env: Any) -> None:
    client, images, nodes = env
    nodes.outcome = "failed"
    nodes.release.set()
    sid = _server(client)
    image_id = _snap(client, sid).json()["image_id"]
    wait_for(lambda: images.deleted == [image_id])
    wait_for(lambda: _task(client, sid) is None)


def test_bad_requests(env: Any) -> None:
    client, images, nodes = env
    sid = _server(client, token=MEMBER_A)
    too_long = client.post(
        f"/v2.1/servers/{sid}/action",
        json={"createImage": {"name": "x" * 256}},
        headers=headers(MEMBER_A, "2.45"),
    )
    assert too_long.status_code == 400 and "longer than 255" in too_long.text
    for bad in ({}, {"name": ""}, {"name": "a", "metadata": {"k": 1}}, {"name": "a", "x": 1}):
        resp = client.post(
            f"/v2.1/servers/{sid}/action", json={"createImage": bad}, headers=headers(MEMBER_A)
        )
        assert resp.status_code == 400, bad
    # another project's server: 404, as if it did not exist
    other = _snap(client, sid, MEMBER_B)
    assert other.status_code == 404
    # a server still building: 409
    slow = str(create(client, "slow1").json()["server"]["id"])
    wait_for(lambda: nodes.builds and status_of(client, slow) == "BUILD")
    resp = _snap(client, slow)
    assert resp.status_code == 409 and "vm_state building" in resp.text
    # a server in ERROR (no valid host: a flavor no node has room for)
    big = create(client, "big", flavorRef="5").json()["server"]["id"]
    wait_for(lambda: status_of(client, big) == "ERROR")
    resp = _snap(client, big)
    assert resp.status_code == 409 and "vm_state error" in resp.text
    # a deleted server
    assert client.delete(f"/v2.1/servers/{sid}", headers=headers(MEMBER_A)).status_code == 204
    resp = _snap(client, sid, MEMBER_A)
    assert resp.status_code == 409 and "vm_state deleted" in resp.text
    assert images.created == {}
