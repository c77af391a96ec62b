"""``cowfleet demo --driver none``: the same tour without a hypervisor, and Ctrl-C cleanup."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_program
from tests.fixtures.demo import DemoRun, parse_size, pid_alive, run_demo

pytestmark = pytest.mark.integration


def test_demo_with_the_none_driver_says_so_and_cleans_up() -> None:
    require_program("mkfs.ext4")
    require_program("mkswap")
    run = run_demo("--driver", "none")
    assert run.returncode == 0, f"{run.out}\n{run.err}"
    out = run.out
    assert "DRIVER: none (asked for with --driver none)" in out
    assert "proves it booted" not in out  # no console step without a hypervisor

    fetches = run.fetch_rows()
    assert set(fetches) == {"node-a", "node-b"}
    for node, instances, images, count, fetched, sent, _naive in fetches.values():
        assert instances == "3" and count == images, node
        assert parse_size(fetched) <= parse_size(sent) < 1.5 * parse_size(fetched)

    home = run.home
    m = re.search(r"backing file: (\S+)\n", out)
    assert m and re.fullmatch(rf"{re.escape(str(home))}/node-a/_base/[0-9a-f]{{40}}", m.group(1))
    assert "image refused (HTTP 415)" in out
    assert len(re.findall(r"^\s+-\s+demo-\w+-[ab][123]\s+", out, re.M)) == 6  # server list

    assert not pid_alive(run.service_pid)
    assert not home.exists()


def test_ctrl_c_stops_the_service_and_removes_everything(tmp_path: Path) -> None:
    require_program("mkfs.ext4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    guest = os.environ.get("COWFLEET_TEST_GUEST_DIR")
    extra = ["--guest-cache", guest] if guest else []
    log = tmp_path / "out.txt"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cowfleet", "demo", "--driver", "none", *extra],
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 300
        while "== 6. Two compute nodes" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    run = DemoRun(proc.returncode or 0, log.read_text(), err)
    assert proc.returncode == 130, f"{run.out}\n{err}"
    assert "Interrupted: cleaning up." in run.out
    assert "Stopped the image service" in run.out
    assert not pid_alive(run.service_pid)
    assert not run.home.exists()
