"""Upload slots: how many uploads may be in flight, on the whole server and per token.

Each upload in flight holds memory (its blocks) and worker threads until it ends or
goes idle for ``upload_idle_timeout`` seconds, so their number is capped. A request
over a cap is answered 503 with ``Retry-After`` before anything is claimed or staged.
Used from the event loop only (no lock needed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from cowfleet.errors import BackendUnavailableError

# Seconds a refused client is told to wait (a typical upload of a few GiB takes longer;
# the client retries anyway).
RETRY_AFTER = 10


class UploadSlots:
    """At most ``total`` uploads at once, and at most ``per_key`` for one key (token)."""

    def __init__(self, total: int, per_key: int) -> None:
        if total <= 0 or per_key <= 0:
            raise ValueError("upload caps must be positive")
        self.total = total
        self.per_key = per_key
        self._by_key: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        return sum(self._by_key.values())

    @contextmanager
    def hold(self, key: str, image_id: str) -> Iterator[None]:
        """A slot for the duration of the block, or 503 (BackendUnavailableError)."""
        if self.in_flight >= self.total:
            raise _busy(f"{self.total} uploads are already in progress on this server", image_id)
        if self._by_key[key] >= self.per_key:
            raise _busy(f"{self.per_key} uploads are already in progress with this token", image_id)
        self._by_key[key] += 1
        try:
            yield
        finally:
            self._by_key[key] -= 1
            if self._by_key[key] <= 0:
                del self._by_key[key]


def _busy(reason: str, image_id: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"upload of image {image_id} refused: {reason}; retry later",
        http_status=503,
        image_id=image_id,
        headers={"Retry-After": str(RETRY_AFTER)},
    )
