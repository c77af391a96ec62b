"""``cowfleet demo --driver none``: the same tour without a hypervisor, and Ctrl-C cleanup."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_program
from tests.fixtures.demo import DemoRun, assert_fleet_part, parse_size, pid_alive, run_demo
from tests.fixtures.images import ImageService

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
    images = int(fetches["node-a"][2])
    assert_fleet_part(run, images)  # compute API, two node agents, boots through the API

    assert not pid_alive(run.service_pid)
    assert not home.exists()


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
            # As from a terminal: a runner started in the background (``cmd &`` in a
            # script) ignores SIGINT, and that disposition would pass on to the demo.
            preexec_fn=_sigint_default,
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


# -- --home DIR: the user's own state in DIR is never touched (issue 13, item 4) -----------


@dataclass
class _ServiceAtHome(ImageService):
    """``serve images`` with only ``COWFLEET_HOME`` set: its data in the default ``HOME/images``."""

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def data_dir(self) -> Path:
        return self.home / "images"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "cowfleet", "serve", "images", "--port", str(self.port)]


def _user_home(tmp_path: Path) -> Path:
    """A home holding a real image service's data (catalog and a stored image) and files
    named like the ones the demo writes."""
    svc = _ServiceAtHome(tmp_path / "svc")
    svc.start()
    try:
        svc.upload("mine", os.urandom(3 * 1024 * 1024) + b"end")
    finally:
        svc.stop()
    home = svc.home
    assert (home / "images" / "token").is_file()
    assert any(p.name.startswith("catalog") for p in (home / "images").iterdir())
    assert max(p.stat().st_size for p in (home / "images").rglob("*") if p.is_file()) > 3 << 20
    for name in ("service.toml", "node-a.toml", "images-serve.log", "work/notes.txt"):
        (home / name).parent.mkdir(exist_ok=True)
        (home / name).write_text(f"the user's own {name}\n")
    return home


def _snapshot(home: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``home``: kind, mode and (for files) the SHA-256 of its bytes."""
    out: dict[str, tuple[str, int, str]] = {}
    for path in sorted(home.rglob("*")):
        st = path.lstat()
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(home))] = ("file", st.st_mode, _sha256(path))
        else:
            out[str(path.relative_to(home))] = ("other", st.st_mode, "")
    return out


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def test_home_with_image_service_data_survives_the_demo(tmp_path: Path) -> None:
    require_program("mkfs.ext4")
    require_program("mkswap")
    home = _user_home(tmp_path)
    before = _snapshot(home)
    run = run_demo("--driver", "none", "--home", str(home))
    assert run.returncode == 0, f"{run.out}\n{run.err}"
    assert _snapshot(home) == before  # today's main removed home/images (the service's data)
    # The demo worked in a fresh folder of its own inside the home, and removed only that.
    assert run.home.parent == home and run.home.name.startswith("cowfleet-demo-")
    assert re.search(rf"Removed\s+{re.escape(str(run.home))}\.\n", run.out)
    assert not run.home.exists()


def test_keep_says_where_everything_was_kept(tmp_path: Path) -> None:
    require_program("mkfs.ext4")
    require_program("mkswap")
    home = _user_home(tmp_path)
    before = _snapshot(home)
    run = run_demo("--driver", "none", "--keep", "--home", str(home))
    pid = run.service_pid
    try:
        assert run.returncode == 0, f"{run.out}\n{run.err}"
        kept = run.home
        assert kept.parent == home and kept.name.startswith("cowfleet-demo-")
        assert re.search(rf"^\s+state:\s+{re.escape(str(kept))}$", run.out, re.M), run.out
        assert re.search(
            rf"^\s+image service:\s+pid {pid} on http://127\.0\.0\.1:\d+$", run.out, re.M
        )
        assert (
            len(re.findall(r"^\s+server:\s+demo-\w+-[ab][123] \(node-[ab]\)$", run.out, re.M)) == 6
        )
        assert re.search(rf"^\s+rm -rf {re.escape(str(kept))}$", run.out, re.M)
        assert pid_alive(pid)
        for node in ("node-a", "node-b"):
            assert len(list((kept / node / "_base").iterdir())) >= 3, node
        assert {k: v for k, v in _snapshot(home).items() if not k.startswith(kept.name)} == before
        fleet = re.findall(
            r"^\s+(?:the compute API|node agent fleet-[ab]): pid (\d+)$", run.out, re.M
        )
        assert len(fleet) == 3 and all(pid_alive(int(p)) for p in fleet), run.out
        assert re.search(r"^\s+fleet server:\s+demo-\w+-db$", run.out, re.M)
    finally:
        pids = [pid, *(int(p) for p in re.findall(r": pid (\d+)$", run.out, re.M))]
        for p in pids:
            if pid_alive(p):
                os.kill(p, signal.SIGTERM)
