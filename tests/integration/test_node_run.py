"""``cowfleet node run``: a real long-running process, real signals, a real image service.

- it runs a pass every ``--interval`` seconds, logs one INFO line per pass, and on
  SIGTERM stops and exits 0 (also when the signal arrives in the middle of a
  rate-limited re-verification: the pacing sleep is cut short);
- a base whose bytes changed after it was cached is found by the periodic
  re-verification, quarantined (moved, with a record, metadata removed, logged at
  ERROR), and ``cowfleet cache fetch`` brings back a verified copy under the same
  name, so the instance's overlay has its backing file again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_program

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1024 * 1024
PASS_RE = re.compile(r"^INFO cowfleet\.cache\.manager: pass (\d+): ", re.MULTILINE)


@dataclass
class Node:
    home: Path
    instances: Path
    env: dict[str, str]
    tmp: Path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cowfleet", *args]

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = self.run(*args, env=env)
        assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def start(self, *args: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"node-run-{time.monotonic_ns()}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                self.argv(*args), env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh
            )
        return proc, log


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(home)
    env["COWFLEET_DRIVER"] = "none"
    yield Node(home, tmp_path / "instances", env, tmp_path)


def _wait_for(log: Path, proc: subprocess.Popen[bytes], pattern: re.Pattern[str], n: int) -> str:
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if len(pattern.findall(text)) >= n:
            return text
        assert proc.poll() is None, f"node run exited {proc.returncode}:\n{text}"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"fewer than {n} matches of {pattern.pattern} in 30s:\n{text}")


def _stop(proc: subprocess.Popen[bytes], log: Path, within: float) -> tuple[float, str]:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        text = log.read_text(errors="replace")
        raise AssertionError(f"node run still running {within}s after SIGTERM:\n{text}") from None
    took = time.monotonic() - sent
    text = log.read_text(errors="replace")
    assert rc == 0, f"node run exited {rc} after SIGTERM:\n{text}"
    return took, text


def _image(size: int, tag: bytes) -> bytes:
    data = bytearray(size)
    data[: len(tag)] = tag
    data[size // 2 : size // 2 + 8192] = os.urandom(8192)
    data[-4:] = b"tail"
    return bytes(data)


def _remote(node: Node, service: Any) -> dict[str, str]:
    env = dict(node.env)
    env["COWFLEET_IMAGE_URL"] = service.url
    env["COWFLEET_IMAGE_TOKEN_FILE"] = str(service.token_file)
    return env


def test_passes_every_interval_and_sigterm_exits_0(node: Node) -> None:
    env = dict(node.env, COWFLEET_VERIFY_INTERVAL="3600", COWFLEET_VERIFY_RATE="1048576")
    proc, log = node.start(
        "node", "run", "--interval", "0.2", "--instances-path", str(node.instances), env=env
    )
    started = time.monotonic()
    text = _wait_for(log, proc, PASS_RE, 2)
    took_two = time.monotonic() - started
    numbers = [int(n) for n in PASS_RE.findall(text)]
    assert numbers[:2] == [1, 2]
    assert f"cache manager on {node.instances}" in text
    assert took_two < 20  # a pass every 0.2 s, not every 600 s (the default)
    took, text = _stop(proc, log, within=5)
    assert took < 5
    assert "node run: SIGTERM received, stopping" in text
    stopped = re.search(r"node run: stopped after (\d+) passes", text)
    assert stopped, text
    assert int(stopped.group(1)) == len(PASS_RE.findall(text)) >= 2
    assert "Traceback" not in text and "ERROR" not in text


def test_sigterm_cuts_a_rate_limited_reverification_short(node: Node, image_service: Any) -> None:
    """A 16 MiB base re-verified at 64 KiB/s would take 256 s; SIGTERM ends it at once."""
    remote = _remote(node, image_service)
    image_id = image_service.upload("slow-verify", _image(16 * MIB, b"SLOW"))
    node.ok("cache", "fetch", image_id, "--instances-path", str(node.instances), env=remote)
    env = dict(node.env, COWFLEET_VERIFY_INTERVAL="0.001", COWFLEET_VERIFY_RATE="65536")
    proc, log = node.start(
        "node", "run", "--interval", "0.2", "--instances-path", str(node.instances), env=env
    )
    # signal handlers are in place once the manager says it runs; its first pass then
    # re-verifies the base (256 s at this rate)
    _wait_for(log, proc, re.compile(r"node run: cache manager on "), 1)
    time.sleep(1.0)
    text = log.read_text()
    assert proc.poll() is None and not PASS_RE.search(text), text
    took, text = _stop(proc, log, within=5)
    assert took < 5  # not the 256 s the re-verification would take
    assert "SIGTERM received, stopping" in text and "stopped after 1 passes" in text
    # nothing was removed or quarantined on the way out
    listing = json.loads(
        node.ok("cache", "list", "--instances-path", str(node.instances), "-o", "json").stdout
    )
    assert [(e["image_id"], e["state"]) for e in listing] == [(image_id, "verified")]


def test_corrupt_base_is_quarantined_and_fetched_again(node: Node, image_service: Any) -> None:
    qemu_img = require_program("qemu-img")
    data = _image(4 * MIB, b"GOOD")
    image_id = image_service.upload("to-corrupt", data)
    remote = _remote(node, image_service)
    inst = ["--instances-path", str(node.instances)]

    fetched = json.loads(
        node.ok("cache", "fetch", image_id, *inst, "-o", "json", env=remote).stdout
    )
    assert fetched["fetched"] is True
    base = Path(fetched["path"])
    name = base.name
    rec = json.loads(
        node.ok(
            "server", "create", "--image", image_id, "--flavor", "m1.tiny", "vm1", *inst, "-o",
            "json", env=remote,
        ).stdout
    )  # fmt: skip
    overlay = node.instances / rec["uuid"] / "disk"
    meta = node.instances / "_base" / ".cowfleet" / f"{name}.json"
    mode = stat.S_IMODE(base.stat().st_mode)
    assert meta.is_file() and mode & 0o444 == 0o444 and mode & 0o022 == 0

    # One byte of the base changes behind the cache's back (bit rot, a stray write).
    before = base.stat()
    os.chmod(base, mode | 0o200)  # a no-op for root, who may write it anyway
    with open(base, "r+b") as fh:
        fh.seek(len(data) // 2 + 100)
        old = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([old[0] ^ 0xFF]))
    os.chmod(base, mode)
    assert base.stat().st_size == before.st_size

    env = dict(node.env, COWFLEET_VERIFY_INTERVAL="0.001", COWFLEET_VERIFY_RATE="1073741824")
    proc = node.run("node", "run", "--once", *inst, "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(v["name"], v["ok"], v["state"]) for v in report["verified"]] == [
        (name, False, "failed")
    ]
    assert "mismatch" in report["verified"][0]["failure"]
    [decision] = [d for d in report["clean"]["decisions"] if d["name"] == name]
    assert (decision["action"], decision["done"]) == ("quarantine", True)
    assert decision["users"] == [rec["uuid"]]

    # moved (the very same file), recorded, metadata gone, said loudly
    qdir = node.instances / "_base" / ".cowfleet" / "quarantine"
    moved = [p for p in qdir.iterdir() if not p.name.endswith(".json")]
    assert len(moved) == 1 and re.fullmatch(rf"{name}\.\d{{8}}T\d{{6}}Z", moved[0].name), moved
    q = moved[0]
    assert q.stat().st_ino == before.st_ino and q.read_bytes() != data
    record = json.loads(q.with_name(q.name + ".json").read_text())
    assert record["name"] == name and record["image_id"] == image_id
    assert record["users"] == [rec["uuid"]] and record["moved_from"] == str(base)
    assert "mismatch" in record["reason"] and record["metadata"]["image_id"] == image_id
    assert not os.path.lexists(base) and not meta.exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert any("QUARANTINED" in line and name in line for line in errors), proc.stderr

    # cache list shows it as quarantined, no longer as a base; the next fetch brings a
    # verified copy back
    listing = json.loads(node.ok("cache", "list", *inst, "-o", "json").stdout)
    assert [(e["name"], e["kind"], e["image_id"], e["users"]) for e in listing] == [
        (f".cowfleet/quarantine/{q.name}", "quarantined", image_id, [rec["uuid"]])
    ]
    again = json.loads(node.ok("cache", "fetch", image_id, *inst, "-o", "json", env=remote).stdout)
    assert again["fetched"] is True and again["path"] == str(base)
    assert base.read_bytes() == data and base.stat().st_ino != before.st_ino
    node.ok("cache", "verify", image_id, *inst)
    chain = json.loads(
        subprocess.run(
            [qemu_img, "info", "--backing-chain", "-f", "qcow2", "--output=json", str(overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [c["filename"] for c in chain] == [str(overlay), str(base)]

    # the next pass finds nothing wrong and keeps the base for its user
    proc = node.run("node", "run", "--once", *inst, "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(v["name"], v["ok"]) for v in report["verified"]] == [(name, True)]
    [decision] = [d for d in report["clean"]["decisions"] if d["name"] == name]
    assert decision["action"] == "keep" and decision["users"] == [rec["uuid"]]
    # the quarantined file is kept for a human to look at, never deleted
    assert q.read_bytes() != data
    assert sorted(p.name for p in qdir.iterdir()) == [q.name, q.name + ".json"]
    assert "ERROR" not in proc.stderr


def _flip_byte(base: Path, at: int) -> None:
    mode = stat.S_IMODE(base.stat().st_mode)
    os.chmod(base, mode | 0o200)
    with open(base, "r+b") as fh:
        fh.seek(at)
        old = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([old[0] ^ 0xFF]))
    os.chmod(base, mode)


def test_quarantined_base_of_a_stopped_instance_comes_back_then_image_gone(
    node: Node, image_service: Any
) -> None:
    """Issue 13, item 1: a quarantined base that a stopped instance still uses is
    fetched again and verified by the next pass while the image exists; once the
    image is deleted, ``cache list`` and ``server show`` say the image is gone."""
    import httpx

    data = _image(4 * MIB, b"KEEP")
    image_id = image_service.upload("stays-bootable", data)
    remote = _remote(node, image_service)
    inst = ["--instances-path", str(node.instances)]
    rec = json.loads(
        node.ok(
            "server", "create", "--image", image_id, "--flavor", "m1.tiny", "vm1", *inst, "-o",
            "json", env=remote,
        ).stdout
    )  # fmt: skip
    base = node.instances / "_base" / Path(rec["disks"][0]["backing"]).name
    assert base.read_bytes() == data
    env = dict(remote, COWFLEET_VERIFY_INTERVAL="0.001", COWFLEET_VERIFY_RATE="1073741824")

    _flip_byte(base, len(data) // 2)
    proc = node.run("node", "run", "--once", *inst, "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    [decision] = [d for d in report["clean"]["decisions"] if d["name"] == base.name]
    assert (decision["action"], decision["done"]) == ("quarantine", True)
    assert [(r["image_id"], r["outcome"]) for r in report["restored"]] == [(image_id, "restored")]
    assert base.read_bytes() == data  # back under its name: the overlay's chain is whole
    node.ok("cache", "verify", image_id, *inst)
    show = json.loads(node.ok("server", "show", "vm1", *inst, "-o", "json").stdout)
    assert show["base_notes"] == []

    r = httpx.delete(f"{image_service.url}/v2/images/{image_id}", headers=image_service.headers)
    assert r.status_code == 204, r.text
    time.sleep(0.01)
    _flip_byte(base, 100)
    proc = node.run("node", "run", "--once", *inst, "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(r["image_id"], r["outcome"]) for r in report["restored"]] == [(image_id, "image gone")]
    assert not base.exists()
    listing = json.loads(node.ok("cache", "list", *inst, "-o", "json").stdout)
    gone = [e for e in listing if e["kind"] == "quarantined" and e["image_id"] == image_id]
    assert "quarantined, image gone" in {e["state"] for e in gone}, listing
    table = node.ok("cache", "list", *inst).stdout
    assert "quarantined, image gone" in table
    shown = node.ok("server", "show", "vm1", *inst).stdout
    assert "image gone" in shown and image_id in shown, shown
    # the next pass says it again, quietly: still gone, no new ERROR line
    proc = node.run("node", "run", "--once", *inst, "-o", "json", env=env)
    assert proc.returncode == 0 and "ERROR" not in proc.stderr, proc.stderr
