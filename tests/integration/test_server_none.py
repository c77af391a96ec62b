"""``cowfleet server ...`` with the none driver: real image service, real cache, real CLI.

Every command is a fresh ``python -m cowfleet`` process, so state must come from
the instance folders, never from memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_program

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
FLAVORS = """
[flavors.t1.full]
vcpus = 1
ram_mb = 256
root_gb = 1
ephemeral_gb = 1
swap_mb = 32
"""


@dataclass
class Node:
    home: Path
    env: dict[str, str]
    instances: Path
    service: Any

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "cowfleet", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cowfleet {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--output", "json").stdout)

    def bases(self) -> dict[str, tuple[int, int, str]]:
        """Every image base: inode, mtime and sha256 (small files only)."""
        out = {}
        for p in sorted((self.instances / "_base").iterdir()):
            if p.is_file() and len(p.name) == 40:
                st = p.stat()
                out[p.name] = (st.st_ino, st.st_mtime_ns, _sha256(p))
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def node(tmp_path: Path, image_service: Any) -> Iterator[Node]:
    require_program("mkfs.ext4")
    require_program("mkswap")
    home = tmp_path / "home"
    cfgfile = tmp_path / "cowfleet.toml"
    cfgfile.write_text(FLAVORS)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_") or k == "COWFLEET_TEST"
    }
    env.update(
        COWFLEET_HOME=str(home),
        COWFLEET_CONFIG=str(cfgfile),
        COWFLEET_IMAGE_URL=image_service.url,
        COWFLEET_IMAGE_TOKEN_FILE=str(image_service.token_file),
        COWFLEET_DRIVER="none",
    )
    yield Node(home, env, home / "instances", image_service)


def read_guest(path: Path, offset: int, length: int) -> bytes:
    """Bytes as the guest sees them, read through qemu (format given, read-only)."""
    qemu_io = require_program("qemu-io")
    proc = subprocess.run(
        [qemu_io, "-r", "-f", "qcow2", "-c", f"read -v {offset} {length}", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    out = bytearray()
    for line in proc.stdout.splitlines():
        head, sep, rest = line.partition(":  ")
        if sep and len(head) == 8 and all(c in "0123456789abcdef" for c in head):
            for tok in rest.split("  ")[0].split():
                out.append(int(tok, 16))
    return bytes(out[:length])


def _raw_image() -> bytes:
    data = bytearray(4 * MIB)
    data[0:16] = b"COWFLEET-IMAGE-0"
    data[3 * MIB : 3 * MIB + 4] = b"tail"
    return bytes(data)


def test_two_servers_share_one_base_and_survive_restarts(node: Node) -> None:
    qemu_img = require_program("qemu-img")
    image_id = node.service.upload("tiny-raw", _raw_image())

    a = node.json("server", "create", "--image", "tiny-raw", "--flavor", "t1.full", "a")
    bases_after_first = node.bases()
    assert len(bases_after_first) == 1  # exactly one image base
    b = node.json("server", "create", "--image", image_id, "--flavor", "t1.full", "b")
    assert node.bases() == bases_after_first  # not fetched again, not rewritten
    base = node.instances / "_base" / next(iter(bases_after_first))
    assert base.name == hashlib.sha1(image_id.encode()).hexdigest()
    mode = base.stat().st_mode
    assert mode & 0o444 == 0o444 and mode & 0o022 == 0  # readable by all, writable by none else

    for rec in (a, b):
        folder = node.instances / rec["uuid"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "console.log",
            "disk",
            "disk.info",
            "disk.local",
            "disk.swap",
            "instance.json",
        ]
        # cowfleet's own reader and qemu-img agree on the backing chain, format pinned
        info = node.json("disk", "info", str(folder / "disk"))
        assert info["backing-filename"] == str(base)
        assert info["backing-filename-format"] == "raw"
        assert info["virtual-size"] == 1024**3
        q = subprocess.run(
            [qemu_img, "info", "-f", "qcow2", "--output=json", str(folder / "disk")],
            capture_output=True,
            text=True,
            check=True,
        )
        qi = json.loads(q.stdout)
        assert qi["full-backing-filename"] == str(base)
        assert qi["backing-filename-format"] == "raw"
        subprocess.run([qemu_img, "check", "-q", "-f", "qcow2", str(folder / "disk")], check=True)
        # the guest sees the image's bytes through the overlay
        assert read_guest(folder / "disk", 0, 16) == b"COWFLEET-IMAGE-0"
        assert read_guest(folder / "disk", 3 * MIB, 4) == b"tail"
        local = node.json("disk", "info", str(folder / "disk.local"))
        assert "_ext4_ephemeral0_" in local["backing-filename"]
        swap = node.json("disk", "info", str(folder / "disk.swap"))
        assert swap["backing-filename"].endswith("/_base/swap_32")
        disk_info = json.loads((folder / "disk.info").read_text())
        assert disk_info == {str(folder / f): "qcow2" for f in ("disk", "disk.local", "disk.swap")}

    # ephemeral base really holds an ext4 filesystem labelled ephemeral0; swap really is swap
    eph = next((node.instances / "_base").glob("ephemeral_1_ext4_ephemeral0_*"))
    with eph.open("rb") as fh:
        fh.seek(1024 + 0x38)
        assert fh.read(2) == b"\x53\xef"
        fh.seek(1024 + 0x78)
        assert fh.read(16).rstrip(b"\0") == b"ephemeral0"
    swapbase = node.instances / "_base" / "swap_32"
    with swapbase.open("rb") as fh:
        fh.seek(4096 - 10)
        assert fh.read(10) == b"SWAPSPACE2"

    # a fresh process lists both, from the folders
    rows = node.json("server", "list")
    assert sorted((r["name"], r["uuid"]) for r in rows) == sorted(
        [("a", a["uuid"]), ("b", b["uuid"])]
    )
    assert {r["state"] for r in rows} == {"shut off (no hypervisor)"}
    assert {r["image"]["id"] for r in rows} == {image_id}
    human = node.run("server", "list").stdout.splitlines()
    assert human[0].split() == ["Id", "Name", "State", "Image", "Flavor"]
    assert any(line.split()[:2] == ["-", "a"] for line in human[2:])

    disks = node.json("server", "disks", "a")
    assert disks == [
        {"target": "vda", "source": str(node.instances / a["uuid"] / "disk")},
        {"target": "vdb", "source": str(node.instances / a["uuid"] / "disk.local")},
        {"target": "vdc", "source": str(node.instances / a["uuid"] / "disk.swap")},
    ]
    assert node.json("server", "show", b["uuid"])["name"] == "b"

    # delete: the folder goes, the base stays, the other server is intact
    node.run("server", "delete", "a")
    assert not (node.instances / a["uuid"]).exists()
    assert node.bases() == bases_after_first
    assert [r["name"] for r in node.json("server", "list")] == ["b"]
    subprocess.run(
        [qemu_img, "check", "-q", "-f", "qcow2", str(node.instances / b["uuid"] / "disk")],
        check=True,
    )
    # the name is free again
    node.run("server", "create", "--image", image_id, "--flavor", "t1.full", "a")
    assert node.bases() == bases_after_first


def test_bad_requests_exit_with_documented_codes_and_leave_nothing(node: Node) -> None:
    image_id = node.service.upload("tiny-raw", _raw_image())
    node.run("server", "create", "--image", image_id, "--flavor", "m1.tiny", "taken")
    before = sorted(p.name for p in node.instances.iterdir())

    def code(*args: str) -> tuple[int, str]:
        proc = node.run("server", "create", *args, check=False)
        return proc.returncode, proc.stderr

    rc, err = code("--image", "no-such-image", "--flavor", "m1.tiny", "x")
    assert rc == 4 and "no-such-image" in err
    rc, err = code("--image", image_id, "--flavor", "m9.huge", "x")
    assert rc == 4 and "flavor" in err
    rc, err = code("--image", image_id, "--flavor", "m1.tiny", "taken")
    assert rc == 5 and "taken" in err
    rc, err = code("--image", image_id, "--flavor", "m1.tiny", "bad/name")
    assert rc == 6 and "name" in err

    from cowfleet.images.client import ImageClient

    with ImageClient(node.service.url, node.service.token) as client:
        queued = client.create(name="queued", disk_format="raw", container_format="bare")
    rc, err = code("--image", queued.id, "--flavor", "m1.tiny", "x")
    assert rc == 5 and "not active" in err

    qemu_img = require_program("qemu-img")
    big = node.home.parent / "big.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(big), "2G"], check=True)
    big_id = node.service.upload("big", big.read_bytes(), disk_format="qcow2")
    rc, err = code("--image", big_id, "--flavor", "m1.tiny", "x")
    assert rc == 6 and "smaller" in err

    rc, err = code(
        "--image",
        image_id,
        "--flavor",
        "m1.tiny",
        "--driver",
        "libvirt",
        "--libvirt-uri",
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        "x",
    )
    assert rc == 8 and "unreachable" in err

    assert sorted(p.name for p in node.instances.iterdir()) == before
    assert [r["name"] for r in node.json("server", "list")] == ["taken"]


def test_broken_folder_is_reported_not_ignored(node: Node) -> None:
    image_id = node.service.upload("tiny-raw", _raw_image())
    rec = node.json("server", "create", "--image", image_id, "--flavor", "m1.tiny", "x")
    (node.instances / rec["uuid"] / "instance.json").unlink()
    proc = node.run("server", "list", "--output", "json")
    rows = json.loads(proc.stdout)
    assert [(r["uuid"], r["state"]) for r in rows] == [(rec["uuid"], "broken-folder")]
    assert rows[0]["problem"]
    human = node.run("server", "list")
    assert "broken-folder" in human.stdout and rec["uuid"] in human.stderr
    node.run("server", "delete", rec["uuid"])
    assert node.json("server", "list") == []
    assert len(node.bases()) == 1
