"""Page-cache residency (``cached_fraction``) and dropping (``drop_cached``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfleet import fsutil

MIB = 1024 * 1024


@pytest.fixture
def half_cached(evictable_dir: Path) -> Iterator[int]:
    """A descriptor on 8 MiB whose first half is cached and second half is not."""
    path = evictable_dir / "data"
    path.write_bytes(os.urandom(8 * MIB))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
    fsutil.drop_cached(fd, 0, 8 * MIB)
    os.pread(fd, 4 * MIB, 0)
    yield fd
    os.close(fd)


def test_cachestat_measures_what_is_cached(half_cached: int) -> None:
    # evictable_dir made sure cachestat(2) or RWF_NOWAIT answers here (else failed in CI).
    assert fsutil.cached_fraction(half_cached, 4 * MIB, 4 * MIB) is not None
    assert fsutil.cached_fraction(half_cached, 0, 4 * MIB) == 1.0
    assert fsutil.cached_fraction(half_cached, 4 * MIB, 4 * MIB) == 0.0
    whole = fsutil.cached_fraction(half_cached, 0, 8 * MIB)
    if not fsutil._cachestat_missing:  # exact only with cachestat(2)
        assert whole == 0.5
    assert fsutil.cached_fraction(half_cached, 0, 0) == 1.0
    fsutil.drop_cached(half_cached, 0, 4 * MIB)
    assert fsutil.cached_fraction(half_cached, 0, 4 * MIB) == 0.0


def test_without_cachestat_a_nonblocking_read_answers(
    half_cached: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsutil, "_cachestat_missing", True)
    assert fsutil.cached_fraction(half_cached, 0, 4 * MIB) == 1.0
    assert fsutil.cached_fraction(half_cached, 4 * MIB, 4 * MIB) == 0.0


def test_drop_cached_ignores_what_it_cannot_do() -> None:
    fsutil.drop_cached(-1, 0, MIB)  # a bad descriptor: advisory, nothing raised
