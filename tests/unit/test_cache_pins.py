"""cache.pins: shared flocks held by provisionings, release tokens, exclusive removal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import cowfleet
from cowfleet.cache import pins
from cowfleet.errors import TimeoutError_

NAME = "a" * 40
OTHER = "b" * 40
SRC = str(Path(cowfleet.__file__).resolve().parents[1])

# Holds a pin until a line arrives on stdin (or the process is killed).
HOLDER = """
import sys
from pathlib import Path
from cowfleet.cache import pins
with pins.hold(Path(sys.argv[1]), sys.argv[2:]):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def _exclusive(locks: Path, name: str = NAME) -> bool:
    with pins.exclusive(locks, name) as free:
        return free


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    return tmp_path / "locks"


@pytest.fixture
def holder(locks: Path) -> Iterator[subprocess.Popen[str]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(locks), NAME, OTHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_held_pin_blocks_exclusive_in_process(locks: Path) -> None:
    assert not pins.is_pinned(locks, NAME) and _exclusive(locks)
    with pins.hold(locks, [NAME, NAME]):  # a name listed twice is pinned once
        assert pins.is_pinned(locks, NAME)
        assert not _exclusive(locks)
        assert not pins.is_pinned(locks, OTHER) and _exclusive(locks, OTHER)
        with pins.hold(locks, [NAME]):  # pins are shared: a second provisioning
            assert not _exclusive(locks)
        assert not _exclusive(locks)  # the first one still holds it
    assert not pins.is_pinned(locks, NAME)
    assert _exclusive(locks)


def test_pin_held_by_another_process(locks: Path, holder: subprocess.Popen[str]) -> None:
    assert pins.is_pinned(locks, NAME) and pins.is_pinned(locks, OTHER)
    assert not _exclusive(locks) and not _exclusive(locks, OTHER)
    before = pins.token(locks, NAME)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    assert holder.wait(10) == 0
    after = pins.token(locks, NAME)
    assert after != before and len(after) == pins.TOKEN_SIZE
    assert pins.token(locks, OTHER) == after  # one token per release, on every pin file
    assert not pins.is_pinned(locks, NAME) and _exclusive(locks)


def test_killed_holder_releases_the_pin(locks: Path, holder: subprocess.Popen[str]) -> None:
    assert pins.is_pinned(locks, NAME) and not _exclusive(locks)
    os.kill(holder.pid, signal.SIGKILL)
    assert holder.wait(10) == -signal.SIGKILL
    assert not pins.is_pinned(locks, NAME)
    assert _exclusive(locks) and _exclusive(locks, OTHER)


def test_every_release_changes_the_token(locks: Path) -> None:
    assert pins.token(locks, NAME) == b""  # never released
    seen = [pins.token(locks, NAME)]
    for _ in range(3):
        with pins.hold(locks, [NAME]):
            assert pins.token(locks, NAME) == seen[-1]  # unchanged while held
        seen.append(pins.token(locks, NAME))
    assert len(set(seen)) == 4
    assert all(len(t) == pins.TOKEN_SIZE for t in seen[1:])


def test_release_after_an_error_still_changes_the_token(locks: Path) -> None:
    with pins.hold(locks, [NAME]):
        pass
    before = pins.token(locks, NAME)
    with pytest.raises(RuntimeError), pins.hold(locks, [NAME]):
        raise RuntimeError("build failed")
    assert pins.token(locks, NAME) != before
    assert not pins.is_pinned(locks, NAME)


def test_exclusive_holder_makes_a_pin_wait_then_time_out(locks: Path) -> None:
    with pins.exclusive(locks, NAME) as free:
        assert free
        with (
            pytest.raises(TimeoutError_, match="cache manager"),
            pins.hold(locks, [NAME], timeout=0.05),
        ):
            pass
    with pins.hold(locks, [NAME], timeout=0.05):
        assert pins.is_pinned(locks, NAME)


def test_probes_create_no_files(tmp_path: Path, locks: Path) -> None:
    assert pins.token(locks, NAME) == b""
    assert not pins.is_pinned(locks, NAME)
    assert not locks.exists()  # not even the directory
    locks.mkdir()
    (locks / "cowfleet-unrelated").write_bytes(b"")
    before = sorted(os.listdir(locks))
    assert pins.token(locks, NAME) == b"" and not pins.is_pinned(locks, NAME)
    assert sorted(os.listdir(locks)) == before
    # a pin file left by an earlier pin: probing it writes nothing either
    with pins.hold(locks, [NAME]):
        pass
    path = pins.pin_path(locks, NAME)
    st = path.stat()
    token = pins.token(locks, NAME)
    assert not pins.is_pinned(locks, NAME)
    assert path.read_bytes() == token
    assert (path.stat().st_mtime_ns, path.stat().st_size) == (st.st_mtime_ns, st.st_size)


def test_symlinked_pin_file_is_not_followed(tmp_path: Path, locks: Path) -> None:
    locks.mkdir()
    target = tmp_path / "target"
    target.write_bytes(b"secret-content-16")
    pins.pin_path(locks, NAME).symlink_to(target)
    assert pins.token(locks, NAME) == b""  # O_NOFOLLOW: not read through the link
    assert not pins.is_pinned(locks, NAME)
    assert target.read_bytes() == b"secret-content-16"
