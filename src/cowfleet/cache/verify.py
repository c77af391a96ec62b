"""Re-verification of cached bases: re-hash and re-inspect, mark the result.

A base that cannot be read (EIO from a failing disk, EACCES, a directory or a
symlink planted in its place) fails verification like one whose digest
differs: it is marked failed, and the next clean pass quarantines it. Nothing
a base's bytes or its disk can do escapes as an exception to the cache manager.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import SHA1_RE, BasePaths, Layout, canonical_image_id
from cowfleet.cache.lock import base_lock
from cowfleet.digest import hash_file
from cowfleet.errors import CowfleetError, LocalIOError, NotFoundError, TimeoutError_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyResult:
    name: str  # base file name (sha1 hex)
    path: Path
    image_id: str | None
    ok: bool
    state: str  # "verified", "failed" or "unknown" (no metadata)
    failure: str | None


class RateLimit:
    """Paces reads to at most ``rate`` bytes per second (a token bucket of one second)."""

    def __init__(
        self,
        rate: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.monotonic = monotonic
        self.sleep = sleep
        self._start = monotonic()
        self._bytes = 0

    def spend(self, n: int) -> None:
        """Account for ``n`` bytes read; sleep until the rate is back under the limit.

        Credit left unused (a pause, a wait for a lock) is kept for one second at
        most, so a slow start never buys a long burst at full speed later.
        """
        now = self.monotonic()
        earliest = now - 1.0 - self._bytes / self.rate  # start that leaves 1 s of credit
        if self._start < earliest:
            self._start = earliest
        self._bytes += n
        ahead = self._bytes / self.rate - (now - self._start)
        if ahead > 0:
            self.sleep(ahead)


def _check_one(
    paths: BasePaths, meta: md.BaseMeta, max_virtual_size: int, limit: RateLimit | None = None
) -> str | None:
    """The reason this base fails verification, or None. A base that cannot be read fails."""
    try:
        return _check(paths, meta, max_virtual_size, limit)
    except LocalIOError as exc:
        return f"read error: {exc}"
    except OSError as exc:
        return f"read error: {paths.base}: {exc.strerror or exc}"


def _check(
    paths: BasePaths, meta: md.BaseMeta, max_virtual_size: int, limit: RateLimit | None
) -> str | None:
    from cowfleet.formats import policy
    from cowfleet.formats.inspector import inspect_path

    try:
        st = os.lstat(paths.base)
    except FileNotFoundError:
        return "base file is missing"
    if not stat.S_ISREG(st.st_mode):
        return "base path is not a regular file"
    if st.st_size != meta.file_size:
        return f"size is {st.st_size}, expected {meta.file_size}"
    digest = hash_file(paths.base, meta.file_hash_algo, limit=limit)
    if not hmac.compare_digest(digest, meta.file_hash_value.lower()):
        expected = meta.file_hash_value[:16]
        return f"{meta.file_hash_algo} mismatch: expected {expected}..., got {digest[:16]}..."
    declared = "raw" if meta.converted_from else meta.disk_format
    try:
        inspection = inspect_path(paths.base)
    except CowfleetError as exc:
        return f"inspection failed: {exc}"
    verdict = policy.check(declared, inspection, max_virtual_size=max_virtual_size)
    if not verdict.safe:
        return "; ".join(f"{f.code}: {f.message}" for f in verdict.failures)
    if inspection.virtual_size != meta.virtual_size:
        return f"virtual size is {inspection.virtual_size}, expected {meta.virtual_size}"
    return None


def verify_bases(
    layout: Layout,
    image_id: str | None = None,
    *,
    lock_timeout: float,
    max_virtual_size: int,
    clock: Callable[[], float] = time.time,
    verified_before: float | None = None,
    limit: RateLimit | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[VerifyResult]:
    """Re-verify one base (``image_id``) or every base; failures are marked in metadata.

    ``verified_before`` keeps only bases last verified before that time (the
    periodic re-verification of ``node run``); ``limit`` paces the reads;
    ``stop`` is asked between bases. ``lock_timeout`` bounds the wait for a base's
    lock; ``clock`` dates the results.
    """
    if image_id is not None:
        iid = canonical_image_id(image_id)
        paths = layout.paths(iid)
        if not os.path.lexists(paths.base):
            raise NotFoundError(f"image {iid} is not cached on this node", image_id=iid)
        targets = [paths]
    else:
        try:
            names = sorted(os.listdir(layout.base_dir))
        except FileNotFoundError:
            names = []
        targets = [layout.paths_for_name(n) for n in names if SHA1_RE.match(n)]
    results: list[VerifyResult] = []
    for paths in targets:
        if stop is not None and stop():
            break
        if verified_before is not None:
            known = md.read_meta(paths.meta)
            if known is None or known.verified_at >= verified_before:
                continue
        try:
            result = _verify_one(layout, paths, lock_timeout, max_virtual_size, clock, limit)
        except TimeoutError_ as exc:
            if image_id is not None:
                raise
            log.warning("base %s not re-verified this time: %s", paths.base, exc)
            continue
        results.append(result)
    return results


def _verify_one(
    layout: Layout,
    paths: BasePaths,
    lock_timeout: float,
    max_virtual_size: int,
    clock: Callable[[], float],
    limit: RateLimit | None,
) -> VerifyResult:
    """Re-verify one base under its lock and record the result in its metadata."""
    with base_lock(layout.locks_dir, paths.name, timeout=lock_timeout):
        meta = md.read_meta(paths.meta)
        if meta is None:
            return VerifyResult(
                paths.name,
                paths.base,
                None,
                False,
                "unknown",
                "no cowfleet metadata: origin and digest unknown",
            )
        failure = _check_one(paths, meta, max_virtual_size, limit)
        now = clock()
        state = md.STATE_FAILED if failure else md.STATE_VERIFIED
        # keep last_used (the metadata mtime) across the rewrite
        used = md.last_used(paths.meta)
        md.write_meta(paths.meta, replace(meta.marked(state, failure, now)))
        if used is not None:
            md.touch(paths.meta, used)
        if failure:
            log.error(
                "base %s (image %s) failed verification: %s", paths.base, meta.image_id, failure
            )
        return VerifyResult(paths.name, paths.base, meta.image_id, failure is None, state, failure)
