from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest

from cowfleet.cache.lock import SlotLimiter, base_lock, lock_path
from cowfleet.errors import LocalIOError, TimeoutError_, UsageError


def _hold(
    locks: str, name: str, ready: mp.synchronize.Event, release: mp.synchronize.Event
) -> None:
    with base_lock(Path(locks), name):
        ready.set()
        release.wait(20)


def _hold_forever(locks: str, name: str, ready: mp.synchronize.Event) -> None:
    with base_lock(Path(locks), name):
        ready.set()
        time.sleep(60)


def test_threads_are_serialised(tmp_path: Path) -> None:
    inside = 0
    worst = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, worst
        for _ in range(20):
            with base_lock(tmp_path, "abc"):
                with guard:
                    inside += 1
                    worst = max(worst, inside)
                time.sleep(0.0005)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == 1
    assert (tmp_path / "cowfleet-abc").is_file()


def test_different_names_do_not_block(tmp_path: Path) -> None:
    with base_lock(tmp_path, "a"), base_lock(tmp_path, "b", timeout=0.2):
        pass


def test_other_process_holding_the_lock_times_us_out(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path), "img", ready, release))
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(TimeoutError_), base_lock(tmp_path, "img", timeout=0.2):
            pass
    finally:
        release.set()
        p.join(10)
    with base_lock(tmp_path, "img", timeout=5):
        pass


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_forever, args=(str(tmp_path), "img", ready))
    p.start()
    assert ready.wait(10)
    assert p.pid is not None
    os.kill(p.pid, 9)
    p.join(10)
    with base_lock(tmp_path, "img", timeout=5):
        pass


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    os.symlink(target, lock_path(tmp_path, "evil"))
    with pytest.raises(LocalIOError, match="symlink"), base_lock(tmp_path, "evil"):
        pass
    assert target.read_text() == "keep"


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden"])
def test_bad_lock_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError), base_lock(tmp_path, name):
        pass


def _slot_user(locks: str, counter: str, n: int) -> None:
    lim = SlotLimiter(Path(locks), n)
    with lim.hold():
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"+")
        time.sleep(0.15)
        os.write(fd, b"-")
        os.close(fd)


def test_slot_limiter_bounds_processes(tmp_path: Path) -> None:
    counter = tmp_path / "trace"
    counter.write_bytes(b"")
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_slot_user, args=(str(tmp_path), str(counter), 2)) for _ in range(5)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
    trace = counter.read_text()
    level = worst = 0
    for c in trace:
        level += 1 if c == "+" else -1
        worst = max(worst, level)
    assert len(trace) == 10
    assert worst == 2
