"""The safety policy: one place that decides whether an inspected image may be used.

Called by the image service on upload and by the node cache on fetch.
(Interface fixed here; the implementation is filled in by the formats work.)
"""

from __future__ import annotations

from dataclasses import dataclass

from cowfleet.config import DEFAULT_MAX_VIRTUAL_SIZE
from cowfleet.formats.inspection import Inspection


@dataclass(frozen=True)
class Failure:
    code: str  # stable name, e.g. "backing-file", "data-file", "format-mismatch"
    message: str  # sentence naming the problem and the values involved


@dataclass(frozen=True)
class Verdict:
    declared_format: str
    detected_format: str
    failures: tuple[Failure, ...]

    @property
    def safe(self) -> bool:
        return not self.failures

    def raise_if_unsafe(self, **context: object) -> None:
        """Raise :class:`~cowfleet.errors.UnsafeImageError` naming every failure."""
        from cowfleet.errors import UnsafeImageError

        if self.failures:
            names = "; ".join(f"{f.code}: {f.message}" for f in self.failures)
            raise UnsafeImageError(f"image refused: {names}", self.failures, **context)


def check(
    declared_format: str,
    inspection: Inspection,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> Verdict:
    """Judge ``inspection`` against ``declared_format`` (a Glance disk_format name)."""
    raise NotImplementedError
