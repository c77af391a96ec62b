"""cache.verify.RateLimit: re-verification reads at most ``rate`` bytes per second."""

from __future__ import annotations

from cowfleet.cache.verify import RateLimit

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += seconds


def test_reads_are_paced_to_the_rate() -> None:
    clock = Clock()
    limit = RateLimit(64 * MiB, monotonic=clock.monotonic, sleep=clock.sleep)
    for _ in range(64):  # 256 MiB in 4 MiB reads, each read taking no time
        limit.spend(4 * MiB)
    assert 3.9 <= clock.t - 100.0 <= 4.0  # 256 MiB at 64 MiB/s, less the first second's credit


def test_unused_credit_is_kept_one_second_at_most() -> None:
    clock = Clock()
    limit = RateLimit(64 * MiB, monotonic=clock.monotonic, sleep=clock.sleep)
    clock.t += 60.0  # a minute waiting for a lock: no minute-long burst afterwards
    start = clock.t
    for _ in range(64):
        limit.spend(4 * MiB)
    assert clock.t - start >= 2.9  # 4 s of reading, at most 1 s of it from saved credit


def test_slow_reads_are_not_slept_further() -> None:
    clock = Clock()
    limit = RateLimit(64 * MiB, monotonic=clock.monotonic, sleep=clock.sleep)
    for _ in range(10):
        clock.t += 1.0  # the disk gives 4 MiB per second: well under the limit
        limit.spend(4 * MiB)
    assert clock.slept == 0.0
