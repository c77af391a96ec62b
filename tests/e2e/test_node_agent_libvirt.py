"""The node agent with the libvirt driver boots the offline test guest (QEMU TCG).

A build request (``PUT /v1/servers/{uuid}``) defines and starts a real domain on
overlays of ``_base``; the agent reports it ACTIVE, then SHUTOFF once the guest
powers itself off (a state change nobody asked for, seen from libvirt), starts
it again on request, and deletes domain and folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing, require_env, require_program
from tests.e2e.test_libvirt_boot import HOLD, _libvirt_uri, _upload_guest
from tests.fixtures.node_agent import FakeController, NodeAgent

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


@pytest.fixture
def agent(image_service: Any) -> Iterator[tuple[NodeAgent, FakeController, str]]:
    guest = Path(require_env("COWFLEET_TEST_GUEST_DIR"))
    uri = _libvirt_uri()
    require_program("qemu-system-x86_64")
    for f in ("vmlinuz", "initramfs.img", "root.img"):
        if not (guest / f).is_file():
            missing(f"test guest incomplete: {guest / f} (run scripts/setup/guest.sh)")
    root = Path(tempfile.mkdtemp(prefix="cowfleet-e2e-node-", dir="/var/tmp"))
    root.chmod(0o755)
    controller = FakeController(image_service.token)
    node = NodeAgent(
        root / "node",
        api_url=controller.url,
        image_url=image_service.url,
        token_file=image_service.token_file,
        driver="libvirt",
        hostname=f"e2e-{secrets.token_hex(3)}",
        extra_env={
            "COWFLEET_LIBVIRT_URI": uri,
            "COWFLEET_VIRT_TYPE": os.environ.get("COWFLEET_TEST_VIRT_TYPE") or "qemu",
        },
    )
    uuid = str(uuid_mod.uuid4())
    node.start()
    try:
        yield node, controller, uuid
    finally:
        node.stop()
        controller.close()
        for cmd in ("destroy", "undefine"):
            subprocess.run(["virsh", "-c", uri, cmd, uuid], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _wait_console(path: Path, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_bytes().decode(errors="replace"):
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not on {path} in {timeout}s")


def test_agent_boots_stops_starts_and_deletes_a_real_guest(
    agent: tuple[NodeAgent, FakeController, str], image_service: Any
) -> None:
    node, controller, uuid = agent
    hb = controller.wait_heartbeat()
    assert hb["hypervisor_type"] == "QEMU"
    marker = secrets.token_hex(8)
    ids = _upload_guest(image_service, marker)
    spec = {
        "uuid": uuid,
        "name": "guest",
        "project_id": "demo",
        "image_id": ids["root"],
        "flavor": {"name": "m1.tiny", "vcpus": 1, "ram_mb": 512, "root_gb": 1},
    }
    assert node.request("PUT", f"/v1/servers/{uuid}", json=spec).status_code == 202
    view = node.wait_state(uuid, "ACTIVE", timeout=180)
    assert view["power_state"] == 1
    console = node.instances / uuid / "console.log"
    _wait_console(console, f"cowfleet-guest: marker written {marker}")
    dom = subprocess.run(
        ["virsh", "-c", os.environ.get("COWFLEET_TEST_LIBVIRT_URI") or "qemu:///system",
         "domname", uuid],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert dom == f"instance-{uuid}"
    # the guest powers itself off after HOLD seconds: the node reports it
    node.wait_state(uuid, "SHUTOFF", timeout=HOLD + 120)
    hb = controller.wait_heartbeat(lambda b: bool(b["instances"]), timeout=30)
    assert hb["instances"][0]["state"] == "SHUTOFF"
    assert (
        node.request("POST", f"/v1/servers/{uuid}/action", json={"action": "stop"}).status_code
        == 409
    )
    assert (
        node.request("POST", f"/v1/servers/{uuid}/action", json={"action": "start"}).status_code
        == 202
    )
    node.wait_state(uuid, "ACTIVE", timeout=60)
    assert node.request("DELETE", f"/v1/servers/{uuid}").status_code == 202
    node.wait_state(uuid, "ABSENT", timeout=60)
    assert not (node.instances / uuid).exists()
    assert len([p for p in (node.instances / "_base").iterdir() if len(p.name) == 40]) == 3
