"""``openstack server create`` through the compute API boots a real guest on a libvirt node.

The image service and the compute API share one tokens file; one node agent runs the
libvirt driver (QEMU TCG unless ``COWFLEET_TEST_VIRT_TYPE`` says kvm). The guest writes
its marker on the console, powers itself off (the API shows SHUTOFF: it takes the node's
state), starts again on ``openstack server start``, and ``server delete --wait`` removes it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_libvirt_boot import HOLD, _libvirt_uri, _upload_guest
from tests.fixtures.fleet import FleetBase, libvirt_env, require_test_guest, shared_tmp
from tests.fixtures.images import ImageService

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ADMIN_TOKEN = "admin-token-" + "e" * 16


class Stack(FleetBase):
    def __init__(self, root: Path, factory: Callable[..., ImageService], uri: str) -> None:
        super().__init__(root, factory, ADMIN_TOKEN)
        self.start_api({"COWFLEET_API_HEARTBEAT_INTERVAL": "1"})
        tag = secrets.token_hex(3)
        (self.node,) = self.start_agents(
            (("node", "127.0.0.2"),),
            driver="libvirt",
            hostname_of=lambda _: f"e2e-{tag}",
            extra_env=libvirt_env(uri),
        )
        self.start_cloud("e2e")

    def osc(self, *args: str, timeout: float = 400) -> Any:
        return super().osc(*args, timeout=timeout)


@pytest.fixture
def stack(image_service_factory: Callable[..., ImageService]) -> Iterator[Stack]:
    require_test_guest()
    uri = _libvirt_uri()
    with shared_tmp("cowfleet-e2e-api-") as root:
        s = Stack(root, image_service_factory, uri)
        try:
            yield s
        finally:
            s.close()


def _wait(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)
    return value


def test_openstack_server_create_boots_a_real_guest(stack: Stack) -> None:
    marker = secrets.token_hex(8)
    _upload_guest(stack.images, marker)
    server = stack.osc(
        "server",
        "create",
        "--image",
        "guest",
        "--flavor",
        "m1.tiny",
        "--nic",
        "none",
        "--wait",
        "vm",
        "-f",
        "json",
    )
    assert server["status"] == "ACTIVE"
    assert server["OS-EXT-SRV-ATTR:host"] == stack.node.hostname
    console = stack.node.instances / server["id"] / "console.log"
    _wait(
        lambda: (
            console.exists()
            and f"cowfleet-guest: marker written {marker}" in console.read_text(errors="replace")
        ),
        180,
    )
    # The guest powers itself off: the API takes the node's state.
    _wait(
        lambda: stack.osc("server", "show", "vm", "-f", "json")["status"] == "SHUTOFF", HOLD + 120
    )
    stack.osc("server", "start", "vm")
    _wait(lambda: stack.osc("server", "show", "vm", "-f", "json")["status"] == "ACTIVE", 120)
    stack.osc("server", "delete", "--wait", "vm")
    _wait(lambda: not (stack.node.instances / server["id"]).exists(), 60)
    assert stack.osc("server", "list", "-f", "json") == []
