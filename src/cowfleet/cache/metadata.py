"""Per-base metadata: one small JSON file per base, written atomically.

Stored as ``_base/.cowfleet/<sha1>.json`` (see :mod:`cowfleet.cache.layout`
for why not beside the base). Written with a temporary name, fsync, rename,
fsync of the directory, so a reader sees the old record or the new one, never
half of one. ``last_used`` is the metadata file's mtime: a cache hit updates
it with one ``utime`` call instead of rewriting the record.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from cowfleet import safeopen
from cowfleet.errors import LocalIOError, StorageFullError, UnsafeFileError
from cowfleet.fsutil import fsync_dir

log = logging.getLogger(__name__)

SCHEMA = 1
STATE_VERIFIED = "verified"
STATE_FAILED = "failed"


@dataclass(frozen=True)
class BaseMeta:
    """What the cache knows about one base file."""

    image_id: str
    name: str | None
    disk_format: str  # the image's declared Glance disk_format
    file_format: str  # format of the file in _base ("raw" after conversion)
    image_size: int  # bytes served by the image service
    file_size: int  # apparent size of the base file
    virtual_size: int
    hash_algo: str  # os_hash_algo of the image ("sha512"), or "md5"
    hash_value: str  # expected digest of the downloaded bytes
    file_hash_algo: str  # digest of the base file itself (differs after conversion)
    file_hash_value: str
    fetched_at: float
    source: str  # image service endpoint
    verified_at: float
    state: str = STATE_VERIFIED
    failure: str | None = None
    converted_from: str | None = None  # the downloaded format when converted to raw
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    schema: int = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseMeta:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def marked(self, state: str, failure: str | None, at: float) -> BaseMeta:
        return replace(self, state=state, failure=failure, verified_at=at)


@dataclass(frozen=True)
class PartMeta:
    """The resume record of a ``.part`` file: what it is a prefix of."""

    image_id: str
    image_size: int
    hash_algo: str
    hash_value: str
    source: str
    started_at: float
    schema: int = SCHEMA
    # The first ``checked`` bytes of the .part passed the verifier ``checked_by`` (a
    # hash tree) and were fsynced before this record was written (see basesink).
    checked_by: str | None = None
    checked: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartMeta:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class FailureRecord:
    """The last failed fetch of a base: callers that waited on it re-raise it."""

    image_id: str
    error: str  # class name in cowfleet.errors
    message: str
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def read_failure(path: Path) -> FailureRecord | None:
    data = _read_json(path)
    if data is None:
        return None
    try:
        return FailureRecord(**{k: data[k] for k in ("image_id", "error", "message", "at")})
    except (KeyError, TypeError):
        return None


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` atomically (temp name + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    data = text.encode()
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(f"no space left writing {path}", path=str(path)) from exc
        raise LocalIOError(f"cannot write {path}: {exc.strerror}", path=str(path)) from exc


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object file (no symlinks followed); None when missing or unreadable."""
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    # Through safeopen: a FIFO planted at a metadata path must not hang a daemon, and a
    # symlink or hard link must not lend another file's content.
    try:
        fd = safeopen.open_path(path)
    except UnsafeFileError as exc:
        log.warning("ignoring metadata file: %s", exc)
        return None
    except LocalIOError:
        return None
    try:
        raw = os.read(fd, 1 << 16)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError:
        log.warning("ignoring unreadable metadata file %s", path)
        return None
    return data if isinstance(data, dict) else None


def read_meta(path: Path) -> BaseMeta | None:
    """The record at ``path``, or None when missing or unreadable."""
    data = _read_json(path)
    if data is None:
        return None
    try:
        return BaseMeta.from_dict(data)
    except TypeError:
        log.warning("ignoring malformed metadata file %s", path)
        return None


def read_part_meta(path: Path) -> PartMeta | None:
    data = _read_json(path)
    if data is None:
        return None
    try:
        return PartMeta.from_dict(data)
    except TypeError:
        return None


def write_meta(path: Path, meta: BaseMeta) -> None:
    write_atomic(path, meta.to_json())


def touch(path: Path, now: float) -> None:
    """Record a use: set the metadata file's mtime to ``now``."""
    try:
        os.utime(path, (now, now), follow_symlinks=False)
    except OSError as exc:
        log.debug("cannot update last_used on %s: %s", path, exc)


def last_used(path: Path) -> float | None:
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return None


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
