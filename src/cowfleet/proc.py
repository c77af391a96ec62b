"""The one subprocess wrapper: argument lists, never a shell; limits; typed errors.

Every external program cowfleet runs (qemu-img, mkfs, mkswap, ...) goes through
:func:`run`. Untrusted input gets :class:`Limits` (CPU seconds and address
space, like ``prlimit``) and a wall-clock timeout.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cowfleet.errors import CommandError, NotFoundError, TimeoutError_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Resource limits applied in the child before exec."""

    cpu_seconds: int | None = 30
    address_space: int | None = 2 * 1024**3

    def preexec(self) -> Callable[[], None]:
        cpu, mem = self.cpu_seconds, self.address_space

        def apply() -> None:
            if cpu is not None:
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            if mem is not None:
                resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

        return apply


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
    start = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limits.preexec() if limits else None,
            env=full_env,
            input=input_text,
            check=False,
        )
    except FileNotFoundError as exc:
        raise NotFoundError(f"program not found: {args[0]}", argv=args) from exc
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError_(
            f"{os.path.basename(args[0])} did not finish within {timeout} s", argv=args
        ) from exc
    except OSError as exc:
        raise CommandError(f"cannot run {args[0]}: {exc.strerror}", argv=args) from exc
    seconds = time.monotonic() - start
    result = Completed(tuple(args), proc.returncode, proc.stdout, proc.stderr, seconds)
    log.debug("ran %s rc=%s in %.3fs", args, proc.returncode, seconds)
    if check and proc.returncode not in ok_codes:
        raise CommandError(
            f"{os.path.basename(args[0])} failed",
            argv=args,
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return result
