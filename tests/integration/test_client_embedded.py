"""The image client (library and ``cowfleet image`` CLI) against the embedded server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cowfleet.errors import ConflictError, NotFoundError, UsageError
from cowfleet.hashtree import DEFAULT_LEAF_SIZE, tree_of
from cowfleet.images.client import ImageClient
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.integration


def cli(svc: ImageService, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(svc.root / "cli-home")
    env["COWFLEET_IMAGE_URL"] = svc.url
    argv = [sys.executable, "-m", "cowfleet", "image", *args]
    if token:
        argv += ["--token-file", str(svc.token_file)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


def cli_json(svc: ImageService, *args: str) -> Any:
    done = cli(svc, *args, "--output", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_full_flow(image_service: ImageService, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 7)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)

    up = cli_json(
        image_service,
        "upload",
        "--name",
        "cirros",
        "--disk-format",
        "raw",
        "--property",
        "os_type=linux",
        "--min-disk",
        "1",
        str(src),
    )
    assert up["status"] == "active"
    assert up["size"] == len(data)
    assert up["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert up["properties"]["os_type"] == "linux"
    assert up["min_disk"] == 1

    listed = cli_json(image_service, "list")
    assert [i["id"] for i in listed] == [up["id"]]
    assert cli_json(image_service, "show", "cirros")["id"] == up["id"]

    changed = cli_json(
        image_service,
        "set",
        "cirros",
        "--name",
        "cirros2",
        "--property",
        "kernel_id=k1",
        "--remove-property",
        "os_type",
    )
    assert changed["name"] == "cirros2"
    # The user's properties, and the hash tree the service computed at upload.
    assert changed["properties"] == {
        "kernel_id": "k1",
        "cowfleet_tree_sha256": tree_of(data).root,
        "cowfleet_tree_leaf_size": str(DEFAULT_LEAF_SIZE),
    }

    out = tmp_path / "copy.raw"
    done = cli(image_service, "download", up["id"], "--file", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == data

    human = cli(image_service, "show", up["id"])
    assert human.returncode == 0 and "cirros2" in human.stdout and "kernel_id='k1'" in human.stdout

    assert cli(image_service, "delete", "cirros2").returncode == 0
    missing = cli(image_service, "show", up["id"])
    assert missing.returncode == 4, missing.stderr


def test_cli_without_token_is_refused(image_service: ImageService) -> None:
    done = cli(image_service, "list", token=False)
    assert done.returncode == 2
    assert "authentication failed" in done.stderr


def test_cli_create_then_ambiguous_name(image_service: ImageService) -> None:
    for _ in range(2):
        cli_json(image_service, "create", "--name", "twin", "--disk-format", "qcow2")
    done = cli(image_service, "show", "twin")
    assert done.returncode == 5
    assert "more than one image" in done.stderr


def test_library_flow_and_token(image_service: ImageService, tmp_path: Path) -> None:
    data = [os.urandom(1 << 20) for _ in range(3)]
    with ImageClient(image_service.url, image_service.token) as client:
        image = client.create(
            name="lib", disk_format="raw", container_format="bare", properties={"ramdisk_id": "r"}
        )
        active = client.upload(image.id, iter(data))  # chunked
        assert active.size == 3 << 20
        assert active.checksum == hashlib.md5(b"".join(data)).hexdigest()
        with pytest.raises(ConflictError):
            client.upload(image.id, iter(data))  # already active
        dest = tmp_path / "lib.raw"
        client.download(image.id, dest)
        assert dest.read_bytes() == b"".join(data)
        with client.open_download(image.id, offset=(3 << 20) - 5) as stream:
            assert (stream.status, stream.offset, stream.total_size) == (
                206,
                (3 << 20) - 5,
                3 << 20,
            )
            assert b"".join(stream.iter_chunks()) == data[-1][-5:]
        client.delete(image.id)
        with pytest.raises(NotFoundError):
            client.get(image.id)
    with ImageClient(image_service.url) as anonymous, pytest.raises(UsageError):
        anonymous.get(image.id)
    with ImageClient(image_service.url, "wrong-token") as wrong, pytest.raises(UsageError):
        list(wrong.list())
