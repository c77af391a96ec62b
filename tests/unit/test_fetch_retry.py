"""The one retry policy: per-stall retries, backoff with jitter, a deadline (injected clock)."""

from __future__ import annotations

import pytest

from cowfleet.errors import BackendUnavailableError, NotFoundError
from cowfleet.fetch.retry import DeadlinePassed, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_backoff_doubles_up_to_the_cap_and_the_last_failure_is_raised() -> None:
    clock = Clock()
    budget = RetryPolicy(retries=4, backoff=1, backoff_max=3, jitter=0).start(
        clock=clock, sleep=clock.sleep
    )
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        raise BackendUnavailableError(f"down {calls}")

    with pytest.raises(BackendUnavailableError, match="down 5"):
        budget.call(flaky, what="get")
    assert clock.sleeps == [1, 2, 3, 3]


def test_jitter_shortens_each_wait_by_at_most_its_fraction() -> None:
    clock = Clock()
    budget = RetryPolicy(retries=2, backoff=2, jitter=0.25).start(
        clock=clock, sleep=clock.sleep, rand=lambda: 1.0
    )
    for _ in range(2):
        budget.failed(BackendUnavailableError("x"), progressed=False, what="w")
    assert clock.sleeps == [1.5, 3.0]


def test_progress_resets_the_retry_count_and_the_backoff() -> None:
    clock = Clock()
    budget = RetryPolicy(retries=1, backoff=1, jitter=0).start(clock=clock, sleep=clock.sleep)
    for _ in range(5):  # one failure per stall, each after progress: never given up
        budget.failed(BackendUnavailableError("x"), progressed=True, what="w")
    assert clock.sleeps == [1, 1, 1, 1, 1]
    with pytest.raises(BackendUnavailableError):
        budget.failed(BackendUnavailableError("stalled"), progressed=False, what="w")


def test_a_wait_past_the_deadline_is_not_taken() -> None:
    clock = Clock()
    budget = RetryPolicy(retries=10, backoff=4, jitter=0, deadline=5).start(
        clock=clock, sleep=clock.sleep
    )
    budget.failed(BackendUnavailableError("x"), progressed=False, what="w")  # waits 4
    with pytest.raises(DeadlinePassed, match="deadline passed"):
        budget.failed(BackendUnavailableError("x"), progressed=False, what="w")  # 8 > 1 left
    assert clock.sleeps == [4]
    clock.t += 1
    with pytest.raises(DeadlinePassed):
        budget.check("w")


def test_errors_that_are_not_the_connections_are_not_retried() -> None:
    clock = Clock()
    budget = RetryPolicy(retries=3).start(clock=clock, sleep=clock.sleep)

    def missing() -> None:
        raise NotFoundError("no such image")

    with pytest.raises(NotFoundError):
        budget.call(missing, what="get")
    assert clock.sleeps == []


def test_an_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.0)
