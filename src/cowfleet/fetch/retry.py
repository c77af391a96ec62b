"""The one retry and backoff policy of every fetch (image records and image bytes).

:class:`RetryPolicy` is a value (how many retries, the backoff, its jitter, the
overall deadline); :meth:`RetryPolicy.start` gives a :class:`Budget` for one job,
with the clock, the sleep and the randomness injected. The retry count is per
stall: an attempt that made progress (bytes landed) resets it, so a long image on
a flaky link is not given up for failures spread over hours.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cowfleet.errors import BackendUnavailableError, TimeoutError_

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF = 0.5
BACKOFF_MAX = 30.0
JITTER = 0.1  # each wait is shortened by up to this fraction, so waiters spread out

# Failures worth another attempt: the connection's, not the data's.
TRANSIENT: tuple[type[BaseException], ...] = (BackendUnavailableError, TimeoutError_)


class DeadlinePassed(TimeoutError_):
    """The job's overall deadline passed (never retried)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a fetch retries: ``retries`` per stall, waits of ``backoff`` seconds doubling
    up to ``backoff_max`` (less up to ``jitter`` of each), all within ``deadline``
    seconds of the start (None: no deadline)."""

    retries: int = 5
    backoff: float = BACKOFF
    backoff_max: float = BACKOFF_MAX
    jitter: float = JITTER
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.backoff_max < self.backoff:
            raise ValueError(f"invalid retry policy {self}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {self.jitter}")

    def start(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> Budget:
        return Budget(self, clock, sleep, rand)


class Budget:
    """The retries and the time left to one job (see :class:`RetryPolicy`)."""

    def __init__(
        self,
        policy: RetryPolicy,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        rand: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.clock = clock
        self._sleep = sleep
        self._rand = rand
        self.deadline = clock() + policy.deadline if policy.deadline is not None else None
        self.attempts = 0
        self._failures = 0
        self._delay = policy.backoff

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - self.clock()

    def check(self, what: str) -> None:
        """Raise :class:`DeadlinePassed` once the deadline is behind us."""
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlinePassed(f"{what}: deadline passed after {self.attempts} attempts")

    def failed(self, exc: BaseException, *, progressed: bool, what: str) -> None:
        """An attempt failed transiently: wait before the next one, or re-raise ``exc``
        when the retries (of this stall) or the time are used up."""
        if progressed:
            self._failures, self._delay = 0, self.policy.backoff
        self._failures += 1
        if self._failures > self.policy.retries:
            raise exc
        wait = self._delay * (1.0 - self.policy.jitter * self._rand())
        left = self.remaining()
        if left is not None and wait >= left:
            raise DeadlinePassed(
                f"{what}: deadline passed after {self.attempts} attempts ({exc})"
            ) from exc
        log.warning(
            "%s: attempt %d failed (%s); retry %d/%d in %.1fs",
            what,
            self.attempts,
            exc,
            self._failures,
            self.policy.retries,
            wait,
        )
        self._sleep(wait)
        self._delay = min(self._delay * 2, self.policy.backoff_max)

    def call(self, fn: Callable[[], T], *, what: str) -> T:
        """``fn()``, retried on transient failures under this budget."""
        while True:
            self.attempts += 1
            try:
                return fn()
            except DeadlinePassed:
                raise
            except TRANSIENT as exc:
                self.failed(exc, progressed=False, what=what)
