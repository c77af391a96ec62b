"""The service token file: read it, or create it (0600, random) when missing."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cowfleet.errors import LocalIOError, UsageError
from cowfleet.images.token_file import read_token_file

TOKEN_BYTES = 32


def load_or_create_token(path: Path, *, allow_insecure: bool = False) -> str:
    """The token in ``path``; a new random one is written there (0600) if the file is
    missing. A file others may read is refused unless ``allow_insecure`` (see
    :mod:`cowfleet.images.token_file`)."""
    try:
        text = read_token_file(path, allow_insecure=allow_insecure)
    except FileNotFoundError:
        return _create(path, allow_insecure)
    if not text:
        raise UsageError(f"token file {path} is empty")
    return text


def _create(path: Path, allow_insecure: bool) -> str:
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return load_or_create_token(path, allow_insecure=allow_insecure)  # made meanwhile
    except OSError as exc:
        raise LocalIOError(f"cannot create token file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return token
