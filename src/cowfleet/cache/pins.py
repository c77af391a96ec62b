"""Pins: a provisioning in progress keeps the bases it is about to use.

Between ``ensure_cached`` returning a base and the instance folder (whose
overlay names that base) being renamed into place, no disk shows the base as
used yet. A pin covers that window.

A pin is a *shared* ``flock`` on ``locks/cowfleet-pin-<base name>``, held by
the provisioning from before it looks the base up until after its folder is in
place. The cache manager takes the same file *exclusively* and without
waiting before it removes a base: it fails while any pin is held. The kernel
drops a flock when its holder dies, so a killed provisioning never leaves a
stale pin.

One race is left: a provisioning that pins, builds and unpins while the
manager is scanning disks, and whose new folder the scan did not see. So
every holder writes a fresh random token into the pin file as it lets go, and
the manager reads the token before its scan and again once it holds the file
exclusively: a different token means a provisioning finished during the scan,
and the base is kept until the next pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from cowfleet.cache.lock import is_held, lock_path, open_lock_file
from cowfleet.errors import TimeoutError_

PIN_PREFIX = "pin-"
TOKEN_SIZE = 16
_POLL = 0.005


def pin_path(locks_dir: Path, name: str) -> Path:
    """The pin file of the base (or ephemeral/swap base) file called ``name``."""
    return lock_path(locks_dir, PIN_PREFIX + name)


def _new_token() -> bytes:
    return os.urandom(8) + time.time_ns().to_bytes(8, "big")


@contextlib.contextmanager
def hold(locks_dir: Path, names: Iterable[str], *, timeout: float = 60.0) -> Iterator[None]:
    """Pin the named ``_base`` files for the ``with`` body.

    Waits (up to ``timeout`` seconds) only while the cache manager is removing
    one of them, which takes milliseconds.
    """
    deadline = time.monotonic() + timeout
    fds: list[int] = []
    try:
        for name in sorted(set(names)):
            fd = open_lock_file(pin_path(locks_dir, name))
            fds.append(fd)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError_(
                            f"timed out pinning {name}: the cache manager holds it", lock=name
                        ) from None
                    time.sleep(_POLL)
        yield
    finally:
        token = _new_token()
        for fd in fds:
            try:
                with contextlib.suppress(OSError):
                    os.pwrite(fd, token, 0)
            finally:
                os.close(fd)  # closing the last descriptor drops the flock


def token(locks_dir: Path, name: str) -> bytes:
    """The pin file's token now: empty when no pin was ever released. Creates nothing."""
    try:
        fd = os.open(pin_path(locks_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, TOKEN_SIZE, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def is_pinned(locks_dir: Path, name: str) -> bool:
    """Whether a pin is held now (read-only probe: creates and writes nothing)."""
    return is_held(pin_path(locks_dir, name))


@contextlib.contextmanager
def exclusive(locks_dir: Path, name: str) -> Iterator[bool]:
    """Hold the pin file exclusively if no pin is held: yields False when one is."""
    fd = open_lock_file(pin_path(locks_dir, name))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
