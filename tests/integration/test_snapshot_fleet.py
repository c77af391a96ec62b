"""``createImage`` on the whole fleet: image service, compute API, two real node agents
(``--driver none``), driven by the unmodified ``openstack`` client and ``cowfleet``.

The guest's writes are made with qemu-io into the instance's overlay (the none driver
runs no guest). The snapshot's bytes must equal the chain's guest-visible content
(``qemu-img compare``), carry Nova's properties, and boot on the other node.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cowfleet import proc, qemuimg
from cowfleet.images.client import ImageClient
from tests.conftest import require_program
from tests.conftest import wait_until as wait
from tests.fixtures.fleet import FleetBase
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "s" * 16
MiB = 1 << 20
BASE = bytearray(16 * MiB)
BASE[0:4096] = b"\x11" * 4096
BASE[9 * MiB : 9 * MiB + 65536] = b"\x22" * 65536


class Fleet(FleetBase):
    def __init__(self, root: Path, factory: Callable[..., ImageService]) -> None:
        require_program("qemu-img")
        require_program("qemu-io")
        super().__init__(root, factory, ADMIN_TOKEN)
        self.image_id = self.images.upload(
            "base", bytes(BASE), visibility="public", min_disk=1, min_ram=64,
            os_command_line="console=ttyS0",
        )  # fmt: skip
        self.start_api(
            {"COWFLEET_API_HEARTBEAT_INTERVAL": "1", "COWFLEET_API_NODE_DOWN_AFTER": "4"}
        )
        self.start_agents()
        self.start_cloud("fleet")


@pytest.fixture
def fleet(tmp_path: Path, image_service_factory: Callable[..., ImageService]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, image_service_factory)
    yield f
    f.close()


def _boot(fleet: Fleet, image: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = fleet.osc(
        "server", "create", "--image", image, "--flavor", "m1.tiny", "--nic", "none",
        "--wait", name, "-f", "json",
    )  # fmt: skip
    assert doc["status"] == "ACTIVE"
    return doc


def test_snapshot_streams_the_chain_and_boots_on_the_other_node(fleet: Fleet) -> None:
    wait(lambda: len(fleet.osc("hypervisor", "list", "-f", "json")) == 2)
    vm1 = _boot(fleet, "base", "vm1")
    host = vm1["OS-EXT-SRV-ATTR:host"]
    disk = fleet.agent(host).instances / vm1["id"] / "disk"
    # "the guest" writes: a marker over the base's data and fresh data further on
    proc.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 2048",
              "-c", f"write -P 0x6b {12 * MiB} 192k", str(disk)])  # fmt: skip

    image = fleet.osc("server", "image", "create", "--name", "snap1", "--wait", "vm1", "-f", "json")
    shown = fleet.osc("image", "show", image["id"], "-f", "json")
    assert shown["status"] == "active" and shown["disk_format"] == "qcow2"
    props = shown["properties"]
    assert props["image_type"] == "snapshot"
    assert props["instance_uuid"] == vm1["id"]
    assert props["base_image_ref"] == fleet.image_id
    assert props["os_command_line"] == "console=ttyS0"
    assert (shown["owner"], shown["min_disk"], shown["min_ram"]) == ("admin", 1, 64)

    # the image's bytes: a standalone qcow2 with the chain's guest-visible content
    out = fleet.root / "snap1.qcow2"
    with ImageClient(fleet.images.url, ADMIN_TOKEN) as client:
        client.download(image["id"], out)
    info = qemuimg.info(out, "qcow2")
    # the root disk's size (the flavor's root_gb), not the base image's
    assert info.backing_filename is None
    assert info.virtual_size == qemuimg.info(disk, "qcow2").virtual_size
    assert qemuimg.check(out, "qcow2").clean
    proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), str(out)])
    reference = fleet.root / "reference.raw"  # what `qemu-img convert` of the chain gives
    qemuimg.convert(disk, "qcow2", reference, "raw")
    proc.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(reference), str(out)])
    # only the allocated data: the base's 2 x 64 KiB clusters, the guest's 192 KiB, tables
    assert out.stat().st_size <= 8 * 65536 + 5 * 65536

    # `cowfleet server image create` prints the new image's id
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COWFLEET_", "OS_"))}
    env.update(
        COWFLEET_API_URL=fleet.api.url, COWFLEET_API_TOKEN=ADMIN_TOKEN,
        COWFLEET_HOME=str(fleet.root / "cli-home"),
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cowfleet", "server", "image", "create", "vm1",
         "--name", "snap2", "--wait", "--image-url", fleet.images.url],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    snap2 = done.stdout.strip()
    assert fleet.osc("image", "show", snap2, "-f", "json")["status"] == "active"
    assert fleet.osc("server", "show", "vm1", "-f", "json")["status"] == "ACTIVE"

    # the snapshot boots on the other node (this one is gone), fetched into its _base
    fleet.agent(host).stop()
    wait(lambda: {h["State"] for h in fleet.osc("hypervisor", "list", "-f", "json")}
         == {"up", "down"}, timeout=30)  # fmt: skip
    vm2 = _boot(fleet, "snap1", "vm2")
    other = vm2["OS-EXT-SRV-ATTR:host"]
    assert other != host
    disk2 = fleet.agent(other).instances / vm2["id"] / "disk"
    proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), str(disk2)])
    backing = qemuimg.info(disk2, "qcow2").full_backing_filename or ""
    assert "/_base/" in backing
