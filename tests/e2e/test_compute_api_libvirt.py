"""``openstack server create`` through the compute API boots a real guest on a libvirt node.

The image service and the compute API share one tokens file; one node agent runs the
libvirt driver (QEMU TCG unless ``COWFLEET_TEST_VIRT_TYPE`` says kvm). The guest writes
its marker on the console, powers itself off (the API shows SHUTOFF: it takes the node's
state), starts again on ``openstack server start``, and ``server delete --wait`` removes it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing, require_env, require_program
from tests.e2e.test_libvirt_boot import HOLD, _libvirt_uri, _upload_guest
from tests.fixtures.compute_api import NODE_TOKEN, ComputeApi, write_tokens
from tests.fixtures.images import ImageService
from tests.fixtures.node_agent import NodeAgent
from tests.fixtures.openstack import OpenStackCloud

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ADMIN_TOKEN = "admin-token-" + "e" * 16


class Stack:
    def __init__(self, root: Path, factory: Callable[..., ImageService], uri: str) -> None:
        self.root = root
        tokens = write_tokens(root / "tokens.toml", ADMIN_TOKEN)
        self.images = factory(tokens_file=tokens)
        self.images.token = ADMIN_TOKEN
        self.api = ComputeApi(
            root / "api", self.images.url, tokens, settings={"COWFLEET_API_HEARTBEAT_INTERVAL": "1"}
        )
        self.api.start()
        node_token = root / "node-token"
        node_token.write_text(NODE_TOKEN + "\n")
        node_token.chmod(0o600)
        self.node = NodeAgent(
            root / "node",
            self.api.url,
            self.images.url,
            node_token,
            driver="libvirt",
            hostname=f"e2e-{secrets.token_hex(3)}",
            extra_env={
                "COWFLEET_LIBVIRT_URI": uri,
                "COWFLEET_VIRT_TYPE": os.environ.get("COWFLEET_TEST_VIRT_TYPE") or "qemu",
            },
        )
        self.node.start()
        self.cloud = OpenStackCloud(root, "e2e", self.api.endpoint, ADMIN_TOKEN, self.images.url)

    def osc(self, *args: str) -> Any:
        out = self.cloud.run(*args, timeout=400).strip()
        return json.loads(out) if "-f" in args and out else out

    def close(self) -> None:
        self.node.stop()
        self.api.stop()


@pytest.fixture
def stack(image_service_factory: Callable[..., ImageService]) -> Iterator[Stack]:
    guest = Path(require_env("COWFLEET_TEST_GUEST_DIR"))
    uri = _libvirt_uri()
    require_program("qemu-system-x86_64")
    for f in ("vmlinuz", "initramfs.img", "root.img"):
        if not (guest / f).is_file():
            missing(f"test guest incomplete: {guest / f} (run scripts/setup/guest.sh)")
    root = Path(tempfile.mkdtemp(prefix="cowfleet-e2e-api-", dir="/var/tmp"))
    root.chmod(0o755)
    s = Stack(root, image_service_factory, uri)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


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
