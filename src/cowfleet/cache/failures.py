"""Sharing a failed fetch with the callers that waited for it.

The callers of one image wait on its base lock; when the fetch of the one that held it
failed, the others raise the same error instead of each fetching again. The failure is
recorded in ``<sha1>.failed`` (:class:`~cowfleet.cache.metadata.FailureRecord`) and
raised again as the same class of the error tree (:func:`shareable`, the subclasses of
:class:`~cowfleet.errors.CowfleetError`); a name outside the tree comes back as
:class:`~cowfleet.errors.CowfleetError`.
"""

from __future__ import annotations

import logging

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import BasePaths
from cowfleet.errors import CowfleetError

log = logging.getLogger(__name__)


def _tree(root: type[CowfleetError]) -> dict[str, type[CowfleetError]]:
    found = {root.__name__: root}
    for sub in root.__subclasses__():
        found.update(_tree(sub))
    return found


def shareable() -> dict[str, type[CowfleetError]]:
    """Every class of the error tree by name (read when needed: subclasses defined in
    modules imported later, such as the fetch engine's, are included)."""
    return _tree(CowfleetError)


def record(paths: BasePaths, image_id: str, exc: CowfleetError, now: float) -> None:
    """Leave ``exc`` for the callers waiting on the lock (best effort)."""
    rec = md.FailureRecord(image_id, type(exc).__name__, str(exc), now)
    try:
        md.write_atomic(paths.failed, rec.to_json(), durable=False)
    except CowfleetError as werr:  # e.g. the disk is full: nothing to share then
        log.debug("cannot record the failure: %s", werr)


def raise_if_failed_since(paths: BasePaths, image_id: str, since: float) -> None:
    """Raise the failure of a fetch that ended while this caller waited (at ``since``)."""
    rec = md.read_failure(paths.failed)
    if rec is None or rec.image_id != image_id or rec.at < since:
        return
    cls = shareable().get(rec.error, CowfleetError)
    raise cls(f"{rec.message} (fetched by another caller while this one waited)", image_id=image_id)


def clear(paths: BasePaths) -> None:
    md.remove_quietly(paths.failed)
