"""Named locks that hold across threads and processes.

``base_lock(locks_dir, name)`` takes an in-process lock for ``name`` (threads
of one process serialise here, cheaply) and then an exclusive ``fcntl.flock``
on ``<locks_dir>/cowfleet-<name>`` (other processes). The kernel drops the
flock when its holder dies, so a killed fetcher never leaves a stale lock.
Lock files are opened with ``O_NOFOLLOW``: a symlink planted at a lock path is
refused, never followed. Lock files are never deleted (deleting a lock file
that another process has open splits the lock in two).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cowfleet.cache.layout import LOCK_PREFIX
from cowfleet.errors import LocalIOError, TimeoutError_, UsageError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_POLL_MIN = 0.005
_POLL_MAX = 0.1


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


_registry: dict[str, _Entry] = {}
_registry_guard = threading.Lock()


def lock_path(locks_dir: Path, name: str) -> Path:
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid lock name {name!r}")
    return locks_dir / f"{LOCK_PREFIX}{name}"


def open_lock_file(path: Path) -> int:
    """Open (creating) a lock file without following symlinks; return the fd."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LocalIOError(
                f"lock file {path} is a symlink; refusing it", path=str(path)
            ) from exc
        raise LocalIOError(f"cannot open lock file {path}: {exc.strerror}", path=str(path)) from exc


def _flock(fd: int, deadline: float | None, what: str, clock: Callable[[], float]) -> None:
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    delay = _POLL_MIN
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        remaining = deadline - clock()
        if remaining <= 0:
            raise TimeoutError_(f"timed out waiting for lock {what}", lock=what)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX)


def is_held(path: Path) -> bool:
    """Whether another open file holds a flock on ``path`` now.

    A read-only probe: it creates nothing and writes nothing, so it is safe on
    a directory that is not ours (a Nova node's). A missing file is not held.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's own lock
    return False


@contextlib.contextmanager
def base_lock(locks_dir: Path, name: str, *, timeout: float | None = None) -> Iterator[None]:
    """Hold the named lock (threads and processes) for the ``with`` body.

    ``timeout`` None waits forever; otherwise :class:`TimeoutError_` after
    ``timeout`` seconds.
    """
    path = lock_path(locks_dir, name)
    clock = time.monotonic
    deadline = None if timeout is None else clock() + timeout
    key = str(path)
    with _registry_guard:
        entry = _registry.get(key)
        if entry is None:
            entry = _registry[key] = _Entry()
        entry.users += 1
    try:
        got = entry.lock.acquire() if timeout is None else entry.lock.acquire(timeout=timeout)
        if not got:
            raise TimeoutError_(f"timed out waiting for lock {name}", lock=name)
        try:
            fd = open_lock_file(path)
            try:
                remaining = None if deadline is None else deadline
                _flock(fd, remaining, name, clock)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            entry.lock.release()
    finally:
        with _registry_guard:
            entry.users -= 1
            if entry.users == 0:
                _registry.pop(key, None)


class SlotLimiter:
    """At most ``slots`` holders across threads (semaphore) and processes (slot files).

    Used to bound parallel downloads of different images on one node: a holder
    takes the process-wide semaphore, then the first free of ``slots`` lock
    files ``<locks_dir>/cowfleet-fetch-slot-<i>``.
    """

    _semaphores: dict[tuple[str, int], threading.BoundedSemaphore] = {}
    _guard = threading.Lock()

    def __init__(self, locks_dir: Path, slots: int, *, prefix: str = "fetch-slot") -> None:
        if slots < 1:
            raise UsageError(f"slots must be positive, not {slots}")
        self.locks_dir = locks_dir
        self.slots = slots
        self.prefix = prefix
        key = (str(locks_dir / prefix), slots)
        with self._guard:
            sem = self._semaphores.get(key)
            if sem is None:
                sem = self._semaphores[key] = threading.BoundedSemaphore(slots)
        self._sem = sem

    @contextlib.contextmanager
    def hold(self, *, deadline: float | None = None) -> Iterator[int]:
        """Hold one slot; yields its index. ``deadline`` is a time.monotonic() value."""
        clock = time.monotonic
        timeout = None if deadline is None else max(0.0, deadline - clock())
        got = self._sem.acquire() if timeout is None else self._sem.acquire(timeout=timeout)
        if not got:
            raise TimeoutError_("timed out waiting for a free download slot")
        try:
            fds = [
                open_lock_file(lock_path(self.locks_dir, f"{self.prefix}-{i}"))
                for i in range(self.slots)
            ]
            try:
                slot = self._take(fds, deadline, clock)
                try:
                    yield slot
                finally:
                    fcntl.flock(fds[slot], fcntl.LOCK_UN)
            finally:
                for fd in fds:
                    os.close(fd)
        finally:
            self._sem.release()

    @staticmethod
    def _take(fds: list[int], deadline: float | None, clock: Callable[[], float]) -> int:
        delay = _POLL_MIN
        while True:
            for i, fd in enumerate(fds):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return i
                except BlockingIOError:
                    continue
            if deadline is not None and clock() >= deadline:
                raise TimeoutError_("timed out waiting for a free download slot")
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX * 2)
