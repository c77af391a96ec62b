"""A clean pass in a tight loop while another process boots 1,000 instances: 0 failures.

Two real processes on one instances path, the real image service on loopback:

- a cleaner running ``clean(cfg, min_age=0)`` back to back, so every base that no
  disk uses and no provisioning pins is removed the moment it is free;
- a booter creating 1,000 ``none``-driver instances through ``Provisioner.create``
  (the code ``server create`` runs), on three images (raw and qcow2) and three
  flavors (root only; + swap; + ephemeral ext4 and swap), deleting older instances
  so only two exist at a time: the third image's base keeps being aged out and
  fetched again.

The booter checks every backing chain after each boot (lstat of every file, read
from the qcow2 headers by its own parser), keeps the chain files open and checks
before each delete that the paths still name the very files it opened, and runs
``qemu-img info --backing-chain`` every 25th boot and on the instances left.
The worker code is in ``_clean_race_worker.py``.

Checked to fail: with ``Provisioner.pin_bases`` made a no-op, 200 boots gave 142
failures (bases removed between ``ensure_cached`` and the folder rename); with the
release-token check (``Executor._remove``, then ``Cleaner._remove``) disabled, 27
(bases removed under live instances whose folder the scan had missed, caught by the
checks before delete).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, require_program

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORKER = Path(__file__).with_name("_clean_race_worker.py")
BOOTS = 1000
MIB = 1024 * 1024
FLAVORS = """
[flavors.race.root]
vcpus = 1
ram_mb = 128
root_gb = 1

[flavors.race.swap]
vcpus = 1
ram_mb = 128
root_gb = 1
swap_mb = 8

[flavors.race.full]
vcpus = 1
ram_mb = 128
root_gb = 1
ephemeral_gb = 1
swap_mb = 8
"""


def _raw(size: int, tag: bytes) -> bytes:
    data = bytearray(size)
    data[: len(tag)] = tag
    data[size // 2 : size // 2 + 4096] = os.urandom(4096)
    return bytes(data)


def _qcow2(tmp: Path, qemu_img: str) -> bytes:
    """A 64 MiB qcow2 image holding 1 MiB of data, made by qemu-img."""
    raw, path = tmp / "src.raw", tmp / "src.qcow2"
    with raw.open("wb") as fh:
        fh.truncate(64 * MIB)
        fh.write(b"RACE-Q" + os.urandom(MIB))
    subprocess.run(
        [qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    return path.read_bytes()


def _env(tmp: Path, service: Any, home: Path, instances: Path) -> dict[str, str]:
    cfgfile = tmp / "cowfleet.toml"
    cfgfile.write_text(FLAVORS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env.update(
        COWFLEET_HOME=str(home),
        COWFLEET_CONFIG=str(cfgfile),
        COWFLEET_INSTANCES_PATH=str(instances),
        COWFLEET_IMAGE_URL=service.url,
        COWFLEET_IMAGE_TOKEN_FILE=str(service.token_file),
        COWFLEET_DRIVER="none",
    )
    return env


def _flavors() -> list[str]:
    """Root-only boots always; swap and ephemeral ones when mkswap/mkfs are there."""
    have = shutil.which("mkswap", path="/usr/sbin:/sbin:/usr/bin:/bin") and shutil.which(
        "mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin:/bin"
    )
    if not have and IN_CI:
        require_program("mkswap")
        require_program("mkfs.ext4")
    return ["race.root", "race.swap", "race.full"] if have else ["race.root"]


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A worker with its output in ``log`` (a pipe nobody reads could fill and stall it)."""
    with log.open("wb") as fh:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def _wait(proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what} did not finish in {timeout}s:\n{_tail(log)}") from None
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{_tail(log)}"


def test_tight_clean_loop_while_booting_1000_instances(image_service: Any, tmp_path: Path) -> None:
    qemu_img = require_program("qemu-img")
    flavors = _flavors()
    images = [
        image_service.upload("race-raw-a", _raw(1 * MIB, b"RACE-A"), "raw"),
        image_service.upload("race-qcow2", _qcow2(tmp_path, qemu_img), "qcow2"),
        image_service.upload("race-raw-b", _raw(2 * MIB, b"RACE-B"), "raw"),
    ]
    home, instances = tmp_path / "home", tmp_path / "instances"
    env = _env(tmp_path, image_service, home, instances)
    env["RACE_FLAVORS"] = ",".join(flavors)
    stop_file = tmp_path / "stop"
    cleaner_out, booter_out = tmp_path / "cleaner.json", tmp_path / "booter.json"
    cleaner_log, booter_log = tmp_path / "cleaner.log", tmp_path / "booter.log"

    started = time.monotonic()
    cleaner = _spawn(
        [sys.executable, str(WORKER), "cleaner", str(cleaner_out), str(stop_file)],
        env,
        cleaner_log,
    )
    booter: subprocess.Popen[bytes] | None = None
    try:
        ready = cleaner_out.with_name(cleaner_out.name + ".ready")
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert cleaner.poll() is None, f"cleaner died:\n{_tail(cleaner_log)}"
            assert time.monotonic() < deadline, "cleaner never finished a first pass"
            time.sleep(0.02)
        booter = _spawn(
            [sys.executable, str(WORKER), "booter", str(booter_out), str(BOOTS), *images],
            env,
            booter_log,
        )
        _wait(booter, 240, "booter", booter_log)
        assert cleaner.poll() is None, f"the cleaner stopped early:\n{_tail(cleaner_log)}"
    finally:
        stop_file.write_text("stop")
        if booter is not None and booter.poll() is None:
            booter.kill()
            booter.wait()
        try:
            cleaner.wait(30)
        except subprocess.TimeoutExpired:
            cleaner.kill()
            cleaner.wait()
    assert cleaner.returncode == 0, f"cleaner exited {cleaner.returncode}:\n{_tail(cleaner_log)}"
    wall = time.monotonic() - started

    boot = json.loads(booter_out.read_text())
    clean = json.loads(cleaner_out.read_text())
    summary = (
        f"{boot['boots']} boots in {boot['seconds']:.1f}s, {clean['passes']} clean passes, "
        f"removals {clean['removed_kinds']}, fetches {boot['fetches']}, kept for pins "
        f"{clean['kept_for_pins']}, {clean['unreadable_passes']} passes with a vanished "
        f"folder, wall {wall:.1f}s"
    )
    print(summary)
    failures = boot["failures"]
    assert failures == [], f"{len(failures)} failures ({summary}):\n" + "\n".join(failures[:10])
    assert clean["errors"] == [], "the cleaner raised:\n" + "\n".join(clean["errors"][:3])
    assert boot["boots"] == BOOTS and boot["deletes"] == BOOTS - len(boot["survivors"])
    for flavor in flavors:
        assert boot["flavors"].get(flavor, 0) > 0, f"no boot used flavor {flavor}"

    # The run proved something: bases were removed under the booter's feet, and every
    # image was fetched again after a removal.
    from cowfleet.cache.layout import base_name

    assert clean["passes"] > 100, summary
    assert clean["removed_kinds"].get("base", 0) >= 1, summary
    # ... and the cleaner met bases pinned by a boot in progress (the race was run)
    assert clean["kept_for_pins"].get("pinned by a provisioning in progress", 0) > 0, summary
    for image_id in images:
        assert boot["fetches"].get(image_id, 0) > 1, f"image {image_id} fetched once: {summary}"
        assert clean["removed"].get(base_name(image_id), 0) >= 1, summary
    assert boot["downloads"] == sum(boot["fetches"].values())
    if len(flavors) > 1:  # the swap/ephemeral bases were aged out and made again too
        assert clean["removed_kinds"].get("swap", 0) >= 1, summary
        assert clean["removed_kinds"].get("ephemeral", 0) >= 1, summary

    # Once everything has stopped, qemu-img still opens every surviving disk's chain.
    assert boot["survivors"]
    for survivor in boot["survivors"]:
        for disk in survivor["disks"]:
            proc = subprocess.run(
                [qemu_img, "info", "--backing-chain", "-f", "qcow2", "--output=json", disk],
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, proc.stderr
            chain = json.loads(proc.stdout)
            assert len(chain) == 2  # overlay -> base
            assert all(Path(c["filename"]).is_file() for c in chain)
            assert Path(chain[1]["filename"]).parent == instances / "_base"
