"""``createImage`` with ``snapshot_compression = zlib`` on a real node agent: the image
service accepts the compressed qcow2, qemu-img finds it clean, compressed and equal to
the chain, the spool is gone, and the snapshot boots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cowfleet import proc, qemuimg
from cowfleet.images.client import ImageClient
from tests.conftest import require_program
from tests.conftest import wait_until as wait
from tests.fixtures.compute_api import NODE_TOKEN, ComputeApi, write_tokens
from tests.fixtures.images import ImageService
from tests.fixtures.node_agent import NodeAgent
from tests.fixtures.openstack import OpenStackCloud

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "z" * 16
MiB = 1 << 20


def _base() -> bytes:
    text = b"".join(b"%08d a line of a text file in the base image\n" % i for i in range(80000))
    base = bytearray(16 * MiB)
    base[: 2 * MiB] = text[: 2 * MiB]
    return bytes(base)


def test_compressed_snapshot_is_clean_smaller_and_boots(
    tmp_path: Path, image_service_factory: Callable[..., ImageService]
) -> None:
    require_program("qemu-img")
    require_program("qemu-io")
    tokens = write_tokens(tmp_path / "tokens.toml", ADMIN_TOKEN)
    images = image_service_factory(tokens_file=tokens)
    images.token = ADMIN_TOKEN
    images.upload("base", _base(), visibility="public", min_disk=1, min_ram=64)
    api = ComputeApi(tmp_path / "api", images.url, tokens)
    api.start()
    node_token = tmp_path / "node-token"
    node_token.write_text(NODE_TOKEN + "\n")
    node_token.chmod(0o600)
    agent = NodeAgent(
        tmp_path / "node-a",
        api.url,
        images.url,
        node_token,
        extra_env={
            "COWFLEET_SNAPSHOT_COMPRESSION": "zlib",
            "COWFLEET_SNAPSHOT_COMPRESS_WORKERS": "2",
        },
    )
    agent.start()
    cloud = OpenStackCloud(tmp_path, "zfleet", api.endpoint, ADMIN_TOKEN, images.url)

    def osc(*args: str) -> Any:
        out = cloud.run(*args, timeout=180).strip()
        return json.loads(out) if "-f" in args and out else out

    try:
        wait(lambda: len(osc("hypervisor", "list", "-f", "json")) == 1)
        boot = ("--flavor", "m1.tiny", "--nic", "none", "--wait", "-f", "json")
        vm1 = osc("server", "create", "--image", "base", *boot, "vm1")
        assert vm1["status"] == "ACTIVE"
        folder = agent.instances / vm1["id"]
        disk = folder / "disk"
        proc.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 2048",
                  "-c", f"write -P 0x6b {12 * MiB} 1M", str(disk)])  # fmt: skip

        image = osc("server", "image", "create", "--name", "zsnap", "--wait", "vm1", "-f", "json")
        shown = osc("image", "show", image["id"], "-f", "json")
        assert shown["status"] == "active" and shown["disk_format"] == "qcow2"
        out = tmp_path / "zsnap.qcow2"
        with ImageClient(images.url, ADMIN_TOKEN) as client:
            client.download(image["id"], out)
        check = qemuimg.check(out, "qcow2")
        assert check.clean, check.raw
        assert (check.compressed_clusters or 0) >= 40  # 2 MiB of text + 1 MiB of pattern
        assert qemuimg.info(out, "qcow2").backing_filename is None
        proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), str(out)])
        # 3 MiB of compressible data in far less than the 3 MiB + tables a plain one takes
        assert out.stat().st_size < 5 * 65536 + MiB
        assert not (folder / "disk.spool").exists()

        vm2 = osc("server", "create", "--image", "zsnap", *boot, "vm2")
        assert vm2["status"] == "ACTIVE"
        disk2 = agent.instances / vm2["id"] / "disk"
        proc.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), str(disk2)])
    finally:
        agent.stop()
        api.stop()
