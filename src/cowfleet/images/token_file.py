"""Reading the image service token file, shared by ``serve images`` and the client.

The token is the only credential of the service, so a token file that others may read
(or replace) is refused with a :class:`~cowfleet.errors.ConfigError` (exit 2) naming
the file, its mode and owner, unless the setting ``images_allow_insecure_token_file``
allows it (then a warning is logged): any permission bit for group or other users. The
file is opened without following a symbolic link, and the checks look at what was
opened; something other than a regular file is always refused.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cowfleet.errors import ConfigError, LocalIOError

log = logging.getLogger(__name__)

# Largest token file read (tokens are a few dozen bytes).
MAX_TOKEN_FILE = 4096


def read_token_file(
    path: Path, *, allow_insecure: bool = False, limit: int = MAX_TOKEN_FILE
) -> str:
    """The stripped text of ``path`` after the permission check (may be empty).

    ``limit`` is the largest file accepted, in bytes.

    FileNotFoundError propagates (callers decide what a missing file means).
    """
    try:
        # O_NONBLOCK: a FIFO planted there must not block the open.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise LocalIOError(
            f"cannot read token file {path}: {exc.strerror}", path=str(path)
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"token file {path} is not a regular file", path=str(path))
        problem = insecure_reason(st)
        if problem:
            if not allow_insecure:
                raise ConfigError(
                    f"token file {path} {problem} (mode {stat.filemode(st.st_mode)}); "
                    f"run `chmod 600 {path}` (or set images.allow_insecure_token_file "
                    "to accept it)",
                    path=str(path),
                )
            log.warning("token file %s %s; accepted (allow_insecure_token_file)", path, problem)
        try:
            raw = os.read(fd, limit + 1)
        except OSError as exc:
            raise LocalIOError(
                f"cannot read token file {path}: {exc.strerror}", path=str(path)
            ) from exc
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise ConfigError(f"token file {path} is larger than {limit} bytes")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"token file {path} is not UTF-8 text") from exc


def insecure_reason(st: os.stat_result) -> str | None:
    """Why a token file with this status is not private, or None when it is."""
    if st.st_mode & 0o077:
        return "can be read or written by other users"
    return None
