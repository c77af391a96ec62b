"""Boot the offline test guest through cowfleet, libvirtd and QEMU (TCG).

The guest (scripts/setup/guest.sh) is uploaded to the embedded image service as
a kernel (aki), an initramfs (ari) and a raw ext4 root disk whose image carries
kernel_id / ramdisk_id / os_command_line. ``cowfleet server create`` boots it; the
guest writes a marker into vda, which must land in the instance's overlay while
the shared base stays byte-for-byte (and owner/mode) unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing, require_env, require_program

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 120.0
HOLD = 10  # seconds the guest stays up after writing its marker


def _libvirt_uri() -> str:
    uri = os.environ.get("COWFLEET_TEST_LIBVIRT_URI") or "qemu:///system"
    virsh = require_program("virsh")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing("libvirt-python not installed (pip install 'cowfleet[libvirt]')")
    proc = subprocess.run([virsh, "-c", uri, "list"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        missing(f"libvirt not reachable at {uri}: {proc.stderr.strip()}")
    return uri


@dataclass
class Node:
    env: dict[str, str]
    instances: Path
    uri: str
    virt_type: str
    prefix: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "cowfleet", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cowfleet {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--output", "json").stdout)

    def virsh(self, *args: str) -> str:
        return subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, check=True
        ).stdout

    def rows(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in self.json("server", "list")}

    def wait_state(self, name: str, state: str, timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.rows().get(name)
            if row is not None and row["state"] == state:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not {state!r} after {timeout} s: {row}")
            time.sleep(0.5)

    def wait_console(self, uuid: str, text: str, timeout: float = BOOT_TIMEOUT) -> str:
        log = self.instances / uuid / "console.log"
        deadline = time.monotonic() + timeout
        while True:
            data = log.read_bytes().decode(errors="replace") if log.exists() else ""
            if text in data:
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the console after {timeout} s:\n{data}")
            time.sleep(0.3)


def _virsh_table(text: str) -> list[list[str]]:
    """Rows of a virsh table (header and rule skipped), columns split on 2+ spaces."""
    import re

    lines = [ln for ln in text.splitlines() if ln.strip()]
    return [re.split(r"\s{2,}", ln.strip()) for ln in lines[2:]]


def _read_guest(path: Path, offset: int, length: int) -> bytes:
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


def _identity(path: Path) -> tuple[str, int, int, int]:
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    st = path.stat()
    return h, st.st_uid, st.st_gid, st.st_mode & 0o7777


@pytest.fixture
def node(image_service: Any) -> Iterator[Node]:
    guest = Path(require_env("COWFLEET_TEST_GUEST_DIR"))
    uri = _libvirt_uri()
    require_program("qemu-system-x86_64")
    for f in ("vmlinuz", "initramfs.img", "root.img"):
        if not (guest / f).is_file():
            missing(f"test guest incomplete: {guest / f} (run scripts/setup/guest.sh)")
    # QEMU runs as libvirt-qemu: the instances path must be traversable by it,
    # which pytest's 0700 tmp directories are not.
    root = Path(tempfile.mkdtemp(prefix="cowfleet-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    home = root / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env.update(
        COWFLEET_HOME=str(home),
        COWFLEET_IMAGE_URL=image_service.url,
        COWFLEET_IMAGE_TOKEN_FILE=str(image_service.token_file),
        COWFLEET_DRIVER="libvirt",
        COWFLEET_LIBVIRT_URI=uri,
    )
    virt_type = os.environ.get("COWFLEET_TEST_VIRT_TYPE") or "qemu"
    n = Node(env, home / "instances", uri, virt_type, f"e2e-{secrets.token_hex(3)}")
    try:
        yield n
    finally:
        # Remove every domain this test defined, whatever happened.
        for name in ("1", "2", "orphan", "missing"):
            subprocess.run(
                ["virsh", "-c", uri, "destroy", f"{n.prefix}-{name}"], capture_output=True
            )
            subprocess.run(
                ["virsh", "-c", uri, "undefine", f"{n.prefix}-{name}"], capture_output=True
            )
        shutil.rmtree(root, ignore_errors=True)


def _upload_guest(service: Any, marker: str) -> dict[str, str]:
    from cowfleet.images.client import ImageClient

    guest = Path(os.environ["COWFLEET_TEST_GUEST_DIR"])
    ids: dict[str, str] = {}
    with ImageClient(service.url, service.token) as client:
        for key, file, fmt in (
            ("kernel", "vmlinuz", "aki"),
            ("ramdisk", "initramfs.img", "ari"),
        ):
            img = client.create(name=f"guest-{key}", disk_format=fmt, container_format=fmt)
            with (guest / file).open("rb") as fh:
                client.upload(img.id, fh, size=(guest / file).stat().st_size)
            ids[key] = img.id
        root = client.create(
            name="guest",
            disk_format="raw",
            container_format="bare",
            kernel_id=ids["kernel"],
            ramdisk_id=ids["ramdisk"],
            os_command_line=f"console=ttyS0 quiet cowfleet.marker={marker} cowfleet.hold={HOLD}",
        )
        with (guest / "root.img").open("rb") as fh:
            client.upload(root.id, fh, size=(guest / "root.img").stat().st_size)
        ids["root"] = root.id
    return ids


def test_boot_marker_lands_in_overlay_and_bases_stay_intact(node: Node, image_service: Any) -> None:
    marker = secrets.token_hex(8)
    ids = _upload_guest(image_service, marker)
    name1, name2 = f"{node.prefix}-1", f"{node.prefix}-2"
    create = ("server", "create", "--image", "guest", "--flavor", "m1.tiny")

    s1 = node.json(*create, "--virt-type", node.virt_type, name1)
    bases = sorted(p for p in (node.instances / "_base").iterdir() if len(p.name) == 40)
    expected = {hashlib.sha1(ids[k].encode()).hexdigest() for k in ("root", "kernel", "ramdisk")}
    assert {p.name for p in bases} == expected
    before = {p.name: _identity(p) for p in bases}
    root_base = node.instances / "_base" / hashlib.sha1(ids["root"].encode()).hexdigest()
    _sha, uid, _gid, mode = before[root_base.name]
    assert uid == 0 and mode & 0o444 == 0o444 and mode & 0o022 == 0  # qemu reads, never writes

    # running: cowfleet agrees with virsh on the domain list and the live disks
    console = node.wait_console(s1["uuid"], f"cowfleet-guest: marker written {marker}")
    assert "ext4-magic 53ef" in console  # the guest read the base's ext4 through the overlay
    row = node.wait_state(name1, "running", timeout=5)
    virsh_rows = {r[1]: r for r in _virsh_table(node.virsh("list", "--all"))}
    assert virsh_rows[name1][0] == str(row["id"]) and virsh_rows[name1][2] == "running"
    ours = [[d["target"], d["source"]] for d in node.json("server", "disks", name1)]
    assert ours == _virsh_table(node.virsh("domblklist", s1["uuid"]))
    assert ours == [["vda", str(node.instances / s1["uuid"] / "disk")]]
    human = _virsh_table(node.run("server", "disks", name1).stdout)
    assert human == _virsh_table(node.virsh("domblklist", name1))

    # a second server of the same image: no second fetch, boots too
    s2 = node.json(*create, "--virt-type", node.virt_type, name2)
    assert {p.name: _identity(p) for p in bases} == before
    assert {p.name for p in (node.instances / "_base").iterdir() if len(p.name) == 40} == expected

    node.run("server", "stop", "--force", name1)
    node.wait_state(name1, "shut off", timeout=30)
    node.wait_console(s2["uuid"], "cowfleet-guest: powering off")
    node.wait_state(name2, "shut off")  # powered itself off

    for s in (s1, s2):
        disk = node.instances / s["uuid"] / "disk"
        want = f"COWFLEET-MARKER {marker}\n".encode()
        assert _read_guest(disk, 0, len(want)) == want
        assert _read_guest(disk, 1080, 2) == b"\x53\xef"  # the rest still comes from the base
    assert not root_base.read_bytes().startswith(b"COWFLEET-MARKER")
    assert {p.name: _identity(p) for p in bases} == before  # content, owner and mode

    # cowfleet list == virsh list --all, for our domains (both shut off now)
    virsh_all = {r[1]: r for r in _virsh_table(node.virsh("list", "--all"))}
    rows = node.rows()
    for name in (name1, name2):
        assert virsh_all[name][0] == "-" and rows[name]["id"] is None
        assert virsh_all[name][2] == rows[name]["state"] == "shut off"
    assert node.run("server", "console", name2).stdout.count("cowfleet-guest: powering off") == 1

    # delete: domains and folders go, every base stays
    for name, s in ((name1, s1), (name2, s2)):
        node.run("server", "delete", name)
        assert not (node.instances / s["uuid"]).exists()
    names = {r[1] for r in _virsh_table(node.virsh("list", "--all"))}
    assert name1 not in names and name2 not in names
    assert {p.name: _identity(p) for p in bases} == before
    assert node.rows() == {}


def test_orphan_and_missing_domains_are_reported(node: Node, image_service: Any) -> None:
    ids = _upload_guest(image_service, "unused")
    create = ("server", "create", "--image", ids["root"], "--flavor", "m1.tiny", "--no-start")
    orphan = node.json(*create, "--virt-type", node.virt_type, f"{node.prefix}-orphan")
    gone = node.json(*create, "--virt-type", node.virt_type, f"{node.prefix}-missing")
    shutil.rmtree(node.instances / orphan["uuid"])
    node.virsh("undefine", gone["uuid"])

    rows = node.rows()
    assert rows[f"{node.prefix}-orphan"]["state"] == "orphan-domain"
    assert rows[f"{node.prefix}-orphan"]["uuid"] == orphan["uuid"]
    assert rows[f"{node.prefix}-missing"]["state"] == "missing-domain"
    listing = node.run("server", "list")
    assert "orphan-domain" in listing.stdout and "missing-domain" in listing.stdout
    assert orphan["uuid"] in listing.stderr and gone["uuid"] in listing.stderr

    node.run("server", "delete", f"{node.prefix}-orphan")  # undefines the orphan domain
    node.run("server", "delete", f"{node.prefix}-missing")  # removes the folder
    assert node.rows() == {}
    names = {r[1] for r in _virsh_table(node.virsh("list", "--all"))}
    assert f"{node.prefix}-orphan" not in names
    assert len([p for p in (node.instances / "_base").iterdir() if len(p.name) == 40]) == 3
