"""The one subprocess wrapper: argument lists, never a shell; limits; typed errors.

Every external program cowfleet runs (qemu-img, mkfs, mkswap, ...) goes through
:func:`run`. Untrusted input gets :class:`Limits` (CPU seconds and address
space) and a wall-clock timeout. The limits are set by util-linux ``prlimit``
put in front of the argv (``prlimit --cpu=30 --as=2147483648 -- qemu-img ...``),
as Nova does: ``preexec_fn`` would run Python code between fork and exec, which
is unsafe in a process with threads (the image service, the node daemon).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cowfleet.errors import CommandError, NotFoundError, TimeoutError_

log = logging.getLogger(__name__)


PRLIMIT = "prlimit"  # util-linux: sets the limits, then execs the program (same pid)


@dataclass(frozen=True)
class Limits:
    """Resource limits (soft = hard) for the child, set by ``prlimit`` before it execs."""

    cpu_seconds: int | None = 30
    address_space: int | None = 2 * 1024**3

    def prefix(self) -> list[str]:
        """``prlimit --cpu=N --as=N --``, or nothing when no limit is set."""
        opts = []
        if self.cpu_seconds is not None:
            opts.append(f"--cpu={self.cpu_seconds}")
        if self.address_space is not None:
            opts.append(f"--as={self.address_space}")
        return [PRLIMIT, *opts, "--"] if opts else []


UNTRUSTED = Limits()


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 120.0,
    limits: Limits | None = None,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
) -> Completed:
    """Run ``argv`` and return its output; raise :class:`CommandError` on failure.

    ``ok_codes`` lists exit codes that count as success when ``check`` is true.
    """
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("empty argv")
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("LC_ALL", "C")
    command = args
    prefix = limits.prefix() if limits is not None else []
    if prefix:
        # Resolved here so that a missing program is still "not found", not an exit
        # code of prlimit.
        program = shutil.which(args[0], path=full_env.get("PATH", os.defpath))
        if program is None:
            raise NotFoundError(f"program not found: {args[0]}", argv=args)
        command = [*prefix, program, *args[1:]]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            input=input_text,
            check=False,
        )
    except FileNotFoundError as exc:
        raise NotFoundError(f"program not found: {command[0]}", argv=args) from exc
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError_(
            f"{os.path.basename(args[0])} did not finish within {timeout} s", argv=args
        ) from exc
    except OSError as exc:
        raise CommandError(f"cannot run {args[0]}: {exc.strerror}", argv=args) from exc
    seconds = time.monotonic() - start
    result = Completed(tuple(args), proc.returncode, proc.stdout, proc.stderr, seconds)
    log.debug("ran %s rc=%s in %.3fs", command, proc.returncode, seconds)
    if check and proc.returncode not in ok_codes:
        raise CommandError(
            f"{os.path.basename(args[0])} failed",
            argv=args,
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return result
