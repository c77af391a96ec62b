"""The one exception tree of cowfleet.

Every error the library raises derives from :class:`CowfleetError`. Errors from
third-party code (httpx, subprocess, libvirt, sqlite) are translated at the
boundary where they happen and never leak upward. The CLI maps each class to a
documented exit code (see ``docs/exit-codes.md`` and :data:`EXIT_CODES`).

::

    CowfleetError                      exit 1
    ├── UsageError                     exit 2   bad arguments, bad configuration
    │   └── ConfigError                exit 2
    ├── LocalIOError                   exit 2   a local file could not be read/written
    │   ├── MissingFileError           exit 2   a local file (or a backing file) is missing
    │   ├── StorageFullError           exit 2   ENOSPC / EDQUOT while writing
    │   └── UnsafeFileError            exit 2   a symlink, hard link, non-regular file or
    │                                           someone else's file where ours must be
    ├── ImageFormatError               exit 3   bytes are not a readable image
    │   └── UnsafeImageError           exit 3   the safety policy refused the image
    ├── NotFoundError                  exit 4   image, base, flavor, server unknown
    ├── ConflictError                  exit 5   name taken, wrong state, already active
    ├── ValidationError                exit 6   request understood but not acceptable
    │                                           (flavor disk too small, min_ram ...)
    ├── IntegrityError                 exit 7   checksum mismatch, truncated or oversized data
    ├── BackendUnavailableError        exit 8   image service / libvirt unreachable, 5xx
    │   └── RemoteError                exit 8   the remote answered with an error status
    ├── CommandError                   exit 9   an external program failed (argv, rc, stderr)
    └── TimeoutError_                  exit 10  a deadline passed
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class CowfleetError(Exception):
    """Root of every cowfleet error. ``context`` carries structured fields."""

    exit_code = 1

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = context

    def __str__(self) -> str:
        return self.message


class UsageError(CowfleetError):
    """The caller asked for something malformed (bad flag, bad value)."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration file or environment holds an invalid value."""


class LocalIOError(CowfleetError):
    """A local file could not be opened, read or written."""

    exit_code = 2


class MissingFileError(LocalIOError):
    """A local file the caller named (or a backing file a disk records) does not exist.

    Every command exits 2 for it, whether it reads the file (``disk info``,
    ``disk inspect``, ``image upload``) or uses it as a backing file (``disk overlay``).
    Unknown images, bases, flavors and servers are :class:`NotFoundError` (exit 4).
    """


class StorageFullError(LocalIOError):
    """The filesystem ran out of space (or quota) while writing."""


class UnsafeFileError(LocalIOError):
    """A name was refused: a symlink, a hard link, not a regular file, or not ours."""


class ImageFormatError(CowfleetError):
    """The data is not a readable disk image (corrupt, truncated, garbage)."""

    exit_code = 3


class UnsafeImageError(ImageFormatError):
    """The safety policy refused an image. ``failures`` names every reason."""

    def __init__(self, message: str, failures: Sequence[Any] = (), **context: Any) -> None:
        super().__init__(message, **context)
        self.failures = tuple(failures)


class NotFoundError(CowfleetError):
    """A named thing (image, base, flavor, server, file) does not exist."""

    exit_code = 4


class ConflictError(CowfleetError):
    """The request conflicts with current state (name taken, wrong status)."""

    exit_code = 5


class ValidationError(CowfleetError):
    """The request is well-formed but not acceptable (e.g. disk smaller than image)."""

    exit_code = 6


class IntegrityError(CowfleetError):
    """Data failed verification: checksum mismatch, truncated or oversized body."""

    exit_code = 7


class BackendUnavailableError(CowfleetError):
    """A service cowfleet depends on (image service, libvirt) cannot be reached."""

    exit_code = 8


class RemoteError(BackendUnavailableError):
    """A remote service answered with an unexpected error status."""

    def __init__(self, message: str, status: int | None = None, **context: Any) -> None:
        super().__init__(message, status=status, **context)
        self.status = status


class CommandError(CowfleetError):
    """An external program failed. Carries argv, exit code and stderr."""

    exit_code = 9

    def __init__(
        self,
        message: str,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        **context: Any,
    ) -> None:
        super().__init__(message, argv=list(argv), returncode=returncode, stderr=stderr, **context)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        tail = self.stderr.strip().splitlines()[-1:] if self.stderr else []
        extra = f": {tail[0]}" if tail else ""
        return f"{self.message} (exit {self.returncode}){extra}"


class TimeoutError_(CowfleetError):
    """A deadline passed (download, subprocess, lock wait)."""

    exit_code = 10


EXIT_CODES: dict[str, int] = {
    "ok": 0,
    "error": CowfleetError.exit_code,
    "usage": UsageError.exit_code,
    "local-io": LocalIOError.exit_code,
    "unsafe-or-bad-image": ImageFormatError.exit_code,
    "not-found": NotFoundError.exit_code,
    "conflict": ConflictError.exit_code,
    "invalid": ValidationError.exit_code,
    "integrity": IntegrityError.exit_code,
    "unavailable": BackendUnavailableError.exit_code,
    "command-failed": CommandError.exit_code,
    "timeout": TimeoutError_.exit_code,
}
