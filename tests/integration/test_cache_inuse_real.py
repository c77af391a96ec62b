"""Issue 13, item 1 (b): a real process holding a base open, or mapping it, keeps it.

Real subprocesses and a real ``cowfleet cache clean`` / ``cache list`` (the
``/proc`` reader of :mod:`cowfleet.cache.holders`); no instance disk names the
bases, so only the processes keep them from the age-out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOLD = """
import sys, time
f = open(sys.argv[1], "rb")
print("ready", flush=True)
time.sleep(600)
"""
MAP = """
import mmap, sys, time
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("ready", flush=True)  # the descriptor is closed: only the mapping holds the file
time.sleep(600)
"""


def _cowfleet(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env.update(COWFLEET_HOME=str(home), COWFLEET_DRIVER="none", COWFLEET_MIN_FREE_PERCENT="0")
    proc = subprocess.run(
        [sys.executable, "-m", "cowfleet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _start(procs: list[subprocess.Popen[str]], code: str, path: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _base(inst: Path, tag: str) -> Path:
    path = inst / "_base" / (tag * 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"BASE " + tag.encode() + bytes(64 * 1024))
    os.utime(path, (1_000_000, 1_000_000))  # unused for decades
    return path


def test_process_holding_or_mapping_a_base_keeps_it_from_age_out(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    inst = tmp_path / "inst"
    held, mapped, free = _base(inst, "a"), _base(inst, "b"), _base(inst, "c")
    p_held = _start(holders, HOLD, held)
    p_mapped = _start(holders, MAP, mapped)
    common = ["--instances-path", str(inst)]

    out = _cowfleet(
        tmp_path, "cache", "clean", "--dry-run", "--min-age", "0", *common, "-o", "json"
    )
    got: dict[str, Any] = {d["name"]: d for d in json.loads(out.stdout)["decisions"]}
    assert got[held.name]["action"] == "keep"
    assert got[mapped.name]["action"] == "keep"
    assert got[free.name]["action"] == "remove" and not got[free.name]["done"]
    [by_held] = got[held.name]["in_use_by"]
    [by_mapped] = got[mapped.name]["in_use_by"]
    assert by_held.startswith(f"process {p_held.pid} python")
    assert by_mapped.startswith(f"process {p_mapped.pid} python")
    assert "in use by process" in got[held.name]["reason"]
    table = _cowfleet(
        tmp_path, "cache", "clean", "--dry-run", "--long", "--min-age", "0", *common
    ).stdout
    assert f"process {p_held.pid}" in table and f"process {p_mapped.pid}" in table

    listing = json.loads(_cowfleet(tmp_path, "cache", "list", *common, "-o", "json").stdout)
    by_name = {e["name"]: e["in_use_by"] for e in listing}
    assert by_name[held.name] == [by_held] and by_name[mapped.name] == [by_mapped]
    assert by_name[free.name] == []
    long = _cowfleet(tmp_path, "cache", "list", "--long", *common).stdout
    assert f"process {p_mapped.pid}" in long and f"process {p_held.pid}" in long
    assert "1 process" in _cowfleet(tmp_path, "cache", "list", *common).stdout

    _cowfleet(tmp_path, "cache", "clean", "--min-age", "0", *common)
    assert held.exists() and mapped.exists() and not free.exists()

    for p in holders:
        p.kill()
        p.wait()
    _cowfleet(tmp_path, "cache", "clean", "--min-age", "0", *common)
    assert not held.exists() and not mapped.exists()  # nothing holds them any more
