"""Issue 13, item 1 (a): a base behind any disk of any defined libvirt domain is in use.

A domain is defined (never started) in the real libvirtd, with one disk: a qcow2
overlay that lives outside the instances path and whose backing file is a base
in ``_base``. No instance folder names the base, and the domain's XML gives no
``<backingStore>``: the chain is read from the overlay's qcow2 header. ``cache
clean`` keeps the base and says "libvirt domain <name>"; once the domain is
undefined, the same pass removes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowfleet.formats.overlay import create_overlay
from tests.e2e.test_libvirt_boot import _libvirt_uri

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

MIB = 1024 * 1024


def _domain_xml(name: str, virt_type: str, disk: Path) -> str:
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


@pytest.fixture
def uri() -> str:
    return _libvirt_uri()


@pytest.fixture
def domains(uri: str) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["virsh", "-c", uri, "undefine", name], capture_output=True, timeout=60)


def _clean(tmp: Path, uri: str, instances: Path, *extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env.update(
        COWFLEET_HOME=str(tmp / "home"),
        COWFLEET_DRIVER="libvirt",
        COWFLEET_LIBVIRT_URI=uri,
        COWFLEET_MIN_FREE_PERCENT="0",
    )
    argv = [sys.executable, "-m", "cowfleet", "cache", "clean", "--min-age", "0", *extra]
    argv += ["--instances-path", str(instances), "-o", "json"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    return {d["name"]: d for d in report["decisions"]}


def test_defined_domain_with_an_overlay_outside_the_instances_path_keeps_its_base(
    tmp_path: Path, uri: str, domains: list[str]
) -> None:
    instances = tmp_path / "instances"
    base_dir = instances / "_base"
    base_dir.mkdir(parents=True)
    used, spare = base_dir / ("1" * 40), base_dir / ("2" * 40)
    for path in (used, spare):
        with open(path, "wb") as fh:
            fh.write(b"BASE")
            fh.truncate(MIB)
        os.chmod(path, 0o444)
        os.utime(path, (1_000_000, 1_000_000))  # unused for decades, by the clock
    overlay = tmp_path / "elsewhere" / "vm.qcow2"  # not under the instances path
    overlay.parent.mkdir()
    create_overlay(overlay, used, "raw", size=MIB, backing_virtual_size=MIB, durable=False)
    os.chmod(tmp_path, 0o755)  # libvirtd reads nothing now, but keep the path traversable

    name = f"cowfleet-inuse-{uuid.uuid4().hex[:8]}"
    xml = tmp_path / "domain.xml"
    virt_type = os.environ.get("COWFLEET_TEST_VIRT_TYPE") or "qemu"
    xml.write_text(_domain_xml(name, virt_type, overlay))
    subprocess.run(["virsh", "-c", uri, "define", str(xml)], check=True, capture_output=True)
    domains.append(name)
    state = subprocess.run(
        ["virsh", "-c", uri, "domstate", name], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert state == "shut off"  # defined, not running

    dry = _clean(tmp_path, uri, instances, "--dry-run")
    assert dry[used.name]["action"] == "keep"
    assert dry[used.name]["in_use_by"] == [f"libvirt domain {name}"]
    assert dry[used.name]["reason"] == f"in use by libvirt domain {name}"
    assert (dry[spare.name]["action"], dry[spare.name]["done"]) == ("remove", False)

    real = _clean(tmp_path, uri, instances)
    assert real[used.name]["action"] == "keep" and used.exists()
    assert real[spare.name]["done"] and not spare.exists()

    subprocess.run(["virsh", "-c", uri, "undefine", name], check=True, capture_output=True)
    domains.remove(name)
    gone = _clean(tmp_path, uri, instances)
    assert gone[used.name]["done"] and not used.exists()  # nothing uses it any more
