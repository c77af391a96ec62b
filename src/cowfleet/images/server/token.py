"""The service token file: read it, or create it (0600, random) when missing."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cowfleet.errors import LocalIOError, UsageError

TOKEN_BYTES = 32


def load_or_create_token(path: Path) -> str:
    """The token in ``path``; a new random one is written there if the file is missing."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return _create(path)
    except OSError as exc:
        raise LocalIOError(f"cannot read token file {path}: {exc.strerror}") from exc
    if not text:
        raise UsageError(f"token file {path} is empty")
    return text


def _create(path: Path) -> str:
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return load_or_create_token(path)  # another process made it first
    except OSError as exc:
        raise LocalIOError(f"cannot create token file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return token
