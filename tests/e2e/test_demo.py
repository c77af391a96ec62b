"""``cowfleet demo --driver libvirt``: six real TCG boots on two nodes, then nothing left.

Runs the demo exactly as a user would (a subprocess, embedded defaults) and
checks the transcript's claims against the machine: guests booted (their console
lines), one fetch per image per node (the cache's records and the bytes the
image service wrote), boot disks backed by ``_base``, what virsh showed, and
that domains, the service process and the demo's directory are gone afterwards.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from cowfleet.demo.transcript import virsh_table
from tests.conftest import missing, require_program
from tests.fixtures.demo import assert_fleet_part, parse_size, pid_alive, run_demo

pytestmark = pytest.mark.e2e

URI = "qemu:///system"


def _require_libvirt() -> None:
    virsh = require_program("virsh")
    require_program("qemu-system-x86_64")
    require_program("mkfs.ext4")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing("libvirt-python not installed (pip install 'cowfleet[libvirt]')")
    proc = subprocess.run([virsh, "-c", URI, "list"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        missing(f"libvirt not reachable at {URI}: {proc.stderr.strip()}")


def _domains() -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", URI, "list", "--all", "--name"], capture_output=True, text=True, check=True
    ).stdout
    return [n.strip() for n in out.splitlines() if n.strip()]


def test_demo_boots_six_guests_on_two_nodes_and_leaves_nothing_behind() -> None:
    _require_libvirt()
    run = run_demo("--driver", "libvirt")
    assert run.returncode == 0, f"{run.out}\n{run.err}"
    out = run.out
    assert "DRIVER: none" not in out and "IMAGE: generated" not in out
    prefix = run.run_prefix

    # six guests booted: each console shows the guest's own boot line
    boots = {r[1]: r for n in ("node-a", "node-b") for r in run.rows(n, 4)}
    assert sorted(boots) == [f"{prefix}{n}{i}" for n in "ab" for i in (1, 2, 3)]
    for row in boots.values():
        assert row[2].startswith("cowfleet-guest: booted "), row

    # one fetch per image per node, not per instance (cache records and service bytes)
    fetches = run.fetch_rows()
    assert set(fetches) == {"node-a", "node-b"}
    for node, instances, images, count, fetched, sent, naive in fetches.values():
        assert (instances, images, count) == ("3", "3", "3"), node
        fetched_b, sent_b = parse_size(fetched), parse_size(sent)
        assert parse_size(naive) == pytest.approx(3 * fetched_b, rel=0.01)
        # the service sent about one copy of each image, far from one per instance
        assert fetched_b * 0.99 <= sent_b < 1.5 * fetched_b, (node, fetched, sent)

    # the boot disk is a qcow2 overlay on a base in that node's _base
    home = run.home
    m = re.search(r"backing file: (\S+)\n", out)
    assert m, out
    assert re.fullmatch(rf"{re.escape(str(home))}/node-a/_base/[0-9a-f]{{40}}", m.group(1))
    assert re.search(r"backing file: \S+/node-a/_base/ephemeral_1_ext4_\S+\n", out)

    # server list == virsh list (running), server disks == virsh domblklist
    ours = re.search(r"\$ cowfleet server disks .*?\n((?:    .*\n)+)", out)
    theirs = re.search(r"\$ virsh -c \S+ domblklist .*?\n((?:    .*\n)+)", out)
    assert ours and theirs
    assert virsh_table(ours.group(1)) == virsh_table(theirs.group(1))
    targets = [row[0] for row in virsh_table(ours.group(1))]
    assert targets == ["vda", "vdb", "vdc"]  # disk, disk.local, disk.swap
    listed = re.findall(
        rf"^\s+(\d+)\s+({prefix}\w+)\s+running\s+demo-root\s+demo.small$", out, re.M
    )
    virsh_listed = re.findall(rf"^\s+(\d+)\s+({prefix}\w+)\s+running$", out, re.M)
    assert len(listed) == 6 and sorted(listed) == sorted(virsh_listed)

    # the hostile image was refused with 415
    assert "image refused (HTTP 415)" in out and "backing-file" in out
    # cache list per node shows the three images as verified bases
    assert len(re.findall(r"^\s+[0-9a-f-]{36}\s+demo-root\s+raw\s+base\s", out, re.M)) == 2

    # the fleet part: compute API and two libvirt node agents, boots through the API
    assert_fleet_part(run, 3)
    fleet_ids = re.findall(
        r"^\s+([0-9a-f-]{36})\s+demo-\w+-(?:web-[12]|app|db)\s+ACTIVE", out, re.M
    )
    assert len(set(fleet_ids)) == 4

    # nothing left behind
    assert not [d for d in _domains() if d.startswith(prefix)]
    assert not {f"instance-{u}" for u in fleet_ids} & set(_domains())
    assert not pid_alive(run.service_pid)
    assert not home.exists()
