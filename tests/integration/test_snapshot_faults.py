"""``createImage`` when things go wrong, on a real fleet (image service, compute API, one
``serve node --driver none``):

- the image service is full (its store on a 6 MiB tmpfs answers 507): the snapshot
  image is deleted, the server stays ACTIVE with its disk unchanged, and the next
  snapshot is accepted;
- the node agent dies mid-snapshot (its marker left in the instance folder, the image
  created, a temporary overlay left): at the next start the agent deletes the image and
  removes the overlay; the instance keeps its disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from cowfleet import proc, qemuimg
from cowfleet.images.client import ImageClient
from tests.conftest import require_program, small_tmpfs
from tests.conftest import wait_until as wait
from tests.fixtures.compute_api import NODE_TOKEN, ComputeApi, write_tokens
from tests.fixtures.images import ImageService, start_image_service
from tests.fixtures.node_agent import NodeAgent

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "x" * 16
MiB = 1 << 20


class OneNode:
    def __init__(self, root: Path, images_root: Path) -> None:
        require_program("qemu-img")
        require_program("qemu-io")
        self.root = root
        tokens = write_tokens(root / "tokens.toml", ADMIN_TOKEN)
        self.images: ImageService = start_image_service(images_root, tokens_file=tokens)
        self.images.token = ADMIN_TOKEN
        self.image_id = self.images.upload("base", b"\x11" * MiB, visibility="public")
        self.api = ComputeApi(
            root / "api", self.images.url, tokens,
            settings={"COWFLEET_API_HEARTBEAT_INTERVAL": "1"},
        )  # fmt: skip
        self.api.start()
        node_token = root / "node-token"
        node_token.write_text(NODE_TOKEN + "\n")
        node_token.chmod(0o600)
        self.agent = NodeAgent(root / "node-a", self.api.url, self.images.url, node_token)
        self.agent.start()
        self.http = httpx.Client(
            base_url=self.api.endpoint,
            timeout=30,
            headers={"X-Auth-Token": ADMIN_TOKEN, "OpenStack-API-Version": "compute 2.81"},
        )

    def server(self, name: str) -> dict[str, Any]:
        wait(lambda: self.http.get("/os-hypervisors").json()["hypervisors"])
        body = {"name": name, "imageRef": self.image_id, "flavorRef": "1", "networks": "none"}
        sid = self.http.post("/servers", json={"server": body}).json()["server"]["id"]
        wait(lambda: self.show(sid)["status"] == "ACTIVE", timeout=60)
        return self.show(sid)

    def show(self, sid: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.http.get(f"/servers/{sid}").json()["server"]
        return doc

    def snapshot(self, sid: str, name: str) -> httpx.Response:
        return self.http.post(f"/servers/{sid}/action", json={"createImage": {"name": name}})

    def image_status(self, image_id: str) -> str | int:
        r = httpx.get(f"{self.images.url}/v2/images/{image_id}", headers=self.images.headers)
        return str(r.json()["status"]) if r.status_code == 200 else r.status_code

    def close(self) -> None:
        self.http.close()
        self.agent.stop()
        self.api.stop()
        self.images.stop()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_image_service_deletes_the_snapshot_and_spares_the_server(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "small", "6m") as small:
        fleet = OneNode(tmp_path, small / "svc")
        try:
            vm = fleet.server("vm1")
            disk = fleet.agent.instances / vm["id"] / "disk"
            proc.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x6b {MiB} 8M", str(disk)])
            before = _digest(disk)
            resp = fleet.snapshot(vm["id"], "too-big")
            assert resp.status_code == 202, resp.text
            image_id = resp.json()["image_id"]
            wait(lambda: fleet.image_status(image_id) == 404, timeout=60)
            wait(lambda: fleet.show(vm["id"])["OS-EXT-STS:task_state"] is None)
            assert fleet.show(vm["id"])["status"] == "ACTIVE"
            assert _digest(disk) == before
            assert qemuimg.check(disk, "qcow2").clean
            folder = disk.parent
            assert not (folder / ".snapshot.json").exists()
            job = fleet.agent.request("GET", f"/v1/servers/{vm['id']}/snapshot").json()
            assert job["state"] == "failed" and "507" in (job["fault"] or "")
            # once there is room (less data), the next snapshot is accepted and works
            proc.run(["qemu-io", "-f", "qcow2", "-c", f"write -z {MiB} 8M", str(disk)])
            ok = fleet.snapshot(vm["id"], "fits").json()["image_id"]
            wait(lambda: fleet.image_status(ok) == "active", timeout=60)
        finally:
            fleet.close()


def test_an_agent_restart_mid_snapshot_deletes_the_image_and_the_overlay(
    tmp_path: Path,
) -> None:
    fleet = OneNode(tmp_path, tmp_path / "svc")
    try:
        vm = fleet.server("vm1")
        folder = fleet.agent.instances / vm["id"]
        before = _digest(folder / "disk")
        # what a snapshot leaves when its agent is killed: the marker, a queued/saving
        # image, and (libvirt) a temporary overlay on top of the disk
        with ImageClient(fleet.images.url, ADMIN_TOKEN) as client:
            image = client.create(name="half", disk_format="qcow2", container_format="bare")
        qemuimg.create(folder / "disk.snap", "qcow2", None, backing=folder / "disk",
                       backing_fmt="qcow2")  # fmt: skip
        marker = folder / ".snapshot.json"
        marker.write_text(json.dumps({"image_id": image.id, "token": ADMIN_TOKEN}))
        os.chmod(marker, 0o600)
        assert fleet.image_status(image.id) == "queued"
        fleet.agent.stop()
        fleet.agent.start()
        assert fleet.image_status(image.id) == 404
        assert not marker.exists() and not (folder / "disk.snap").exists()
        assert _digest(folder / "disk") == before
        assert fleet.agent.request("GET", f"/v1/servers/{vm['id']}").json()["state"] == "ACTIVE"
    finally:
        fleet.close()


def test_bad_requests_on_the_real_fleet(tmp_path: Path) -> None:
    from tests.fixtures.compute_api import OTHER_TOKEN

    fleet = OneNode(tmp_path, tmp_path / "svc")
    try:
        vm = fleet.server("vm1")
        long = fleet.snapshot(vm["id"], "x" * 256)
        assert long.status_code == 400 and "longer than 255" in long.text
        other = httpx.post(
            f"{fleet.api.endpoint}/servers/{vm['id']}/action",
            json={"createImage": {"name": "mine"}},
            headers={"X-Auth-Token": OTHER_TOKEN},
            timeout=30,
        )
        assert other.status_code == 404
        first = fleet.snapshot(vm["id"], "one")
        second = fleet.snapshot(vm["id"], "two")
        assert first.status_code == 202
        assert second.status_code == 409 and "task_state image_" in second.text
        wait(lambda: fleet.image_status(first.json()["image_id"]) == "active", timeout=60)
        # ERROR: no node has room for m1.xlarge
        body = {"name": "big", "imageRef": fleet.image_id, "flavorRef": "5", "networks": "none"}
        big = fleet.http.post("/servers", json={"server": body}).json()["server"]["id"]
        wait(lambda: fleet.show(big)["status"] == "ERROR", timeout=60)
        resp = fleet.snapshot(big, "err")
        assert resp.status_code == 409 and "vm_state error" in resp.text
        # BUILD: the node is frozen, so the build cannot end while we ask
        assert fleet.agent.proc is not None
        fleet.agent.proc.send_signal(signal.SIGSTOP)
        try:
            body = {"name": "slow", "imageRef": fleet.image_id, "flavorRef": "1",
                    "networks": "none"}  # fmt: skip
            slow = fleet.http.post("/servers", json={"server": body}).json()["server"]["id"]
            resp = fleet.snapshot(slow, "building")
            assert resp.status_code == 409 and "vm_state building" in resp.text
        finally:
            fleet.agent.proc.send_signal(signal.SIGCONT)
        # deleted
        assert fleet.http.delete(f"/servers/{vm['id']}").status_code == 204
        resp = fleet.snapshot(vm["id"], "gone")
        assert resp.status_code == 409 and "vm_state deleted" in resp.text
    finally:
        fleet.close()
