"""Re-verification of cached bases: re-hash and re-inspect, mark the result."""

from __future__ import annotations

import hmac
import logging
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import SHA1_RE, BasePaths, canonical_image_id
from cowfleet.cache.lock import base_lock
from cowfleet.cache.sink import new_hasher
from cowfleet.errors import CowfleetError, LocalIOError, NotFoundError

if TYPE_CHECKING:
    from cowfleet.cache.cache import ImageCache

log = logging.getLogger(__name__)
READ_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class VerifyResult:
    name: str  # base file name (sha1 hex)
    path: Path
    image_id: str | None
    ok: bool
    state: str  # "verified", "failed" or "unknown" (no metadata)
    failure: str | None


def hash_file(path: Path, algo: str) -> str:
    """Digest of a file (no symlinks followed), read 4 MiB at a time."""
    h = new_hasher(algo)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalIOError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
    try:
        while True:
            data = os.read(fd, READ_SIZE)
            if not data:
                break
            h.update(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def _check_one(paths: BasePaths, meta: md.BaseMeta, max_virtual_size: int) -> str | None:
    """The reason this base fails verification, or None."""
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
    digest = hash_file(paths.base, meta.file_hash_algo)
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


def verify_bases(cache: ImageCache, image_id: str | None = None) -> list[VerifyResult]:
    """Re-verify one base (``image_id``) or every base; failures are marked in metadata."""
    layout = cache.layout
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
        with base_lock(layout.locks_dir, paths.name, timeout=cache.cfg.fetch_deadline):
            meta = md.read_meta(paths.meta)
            if meta is None:
                results.append(
                    VerifyResult(
                        paths.name,
                        paths.base,
                        None,
                        False,
                        "unknown",
                        "no cowfleet metadata: origin and digest unknown",
                    )
                )
                continue
            failure = _check_one(paths, meta, cache.cfg.max_virtual_size)
            now = cache.clock()
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
            results.append(
                VerifyResult(paths.name, paths.base, meta.image_id, failure is None, state, failure)
            )
    return results
