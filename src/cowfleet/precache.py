"""Pre-cache progress: the per-node states, their order, and the summary of a pre-cache.

Shared by the compute API (which stores one row per node) and the node agent (which
reports its fetch). Pure: no I/O, no clock.

::

    queued ──> fetching ──> verifying ──> cached
       │           │             │
       │           └─────────────┴──────> failed
       ├──> cached   (the node already held the image: nothing fetched)
       ├──> failed   (the node could not be asked, or refused)
       └──> skipped  (the node was down, or is not a registered node)

A state never moves backwards: a late or reordered progress report is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

QUEUED = "queued"
FETCHING = "fetching"
VERIFYING = "verifying"
CACHED = "cached"
FAILED = "failed"
SKIPPED = "skipped"

STATES = (QUEUED, FETCHING, VERIFYING, CACHED, FAILED, SKIPPED)
TERMINAL = frozenset({CACHED, FAILED, SKIPPED})
ACTIVE = frozenset({QUEUED, FETCHING, VERIFYING})
_RANK = {QUEUED: 0, FETCHING: 1, VERIFYING: 2, CACHED: 3, FAILED: 3, SKIPPED: 3}

ORIGIN = "origin"  # the source of bytes fetched from the image service

# Overall state of a pre-cache.
RUNNING = "running"
DONE = "done"  # every node cached or skipped
DONE_WITH_FAILURES = "failed"  # over, and at least one node failed


def may_move(current: str, new: str) -> bool:
    """True when a node in ``current`` may be reported in ``new`` (same state included)."""
    if current not in _RANK or new not in _RANK:
        return False
    if current in TERMINAL:
        return False
    if new == SKIPPED:
        return current == QUEUED
    return _RANK[new] >= _RANK[current]


@dataclass(frozen=True)
class NodeProgress:
    """One node's progress, as reported (validated once where it enters)."""

    state: str
    bytes_done: int = 0
    bytes_total: int | None = None
    rate: float = 0.0  # bytes per second, over the last report interval
    source: str | None = None  # "origin", a peer's hostname, or None (nothing fetched)
    error: str | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> NodeProgress:
        """Raises ValueError naming the bad field."""
        state = doc.get("state")
        if state not in STATES:
            raise ValueError(f"'state' must be one of {', '.join(STATES)}")
        done = doc.get("bytes_done", 0)
        total = doc.get("bytes_total")
        rate = doc.get("rate", 0.0)
        if not _count(done):
            raise ValueError("'bytes_done' must be a whole number >= 0")
        if total is not None and not _count(total):
            raise ValueError("'bytes_total' must be a whole number >= 0 or null")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
            raise ValueError("'rate' must be a number >= 0")
        source = doc.get("source")
        if source is not None and (not isinstance(source, str) or not 0 < len(source) <= 255):
            raise ValueError("'source' must be a short string or null")
        error = doc.get("error")
        if error is not None and not isinstance(error, str):
            raise ValueError("'error' must be a string or null")
        return cls(
            state=str(state),
            bytes_done=int(done),
            bytes_total=None if total is None else int(total),
            rate=float(rate),
            source=source,
            error=error[:1024] if error else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate": self.rate,
            "source": self.source,
            "error": self.error,
        }


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


@dataclass(frozen=True)
class Summary:
    state: str  # RUNNING, DONE or DONE_WITH_FAILURES
    counts: dict[str, int]
    bytes_done: int
    bytes_total: int | None  # None while a fetching node has not said its total
    rate: float


def summarize(nodes: Iterable[NodeProgress]) -> Summary:
    """The overall state of a pre-cache from its nodes' progress."""
    counts = dict.fromkeys(STATES, 0)
    done = 0
    total: int | None = 0
    rate = 0.0
    for n in nodes:
        counts[n.state] += 1
        if n.state == SKIPPED:
            continue
        done += n.bytes_done
        rate += n.rate if n.state in ACTIVE else 0.0
        if total is not None:
            total = None if n.bytes_total is None else total + n.bytes_total
    if any(counts[s] for s in ACTIVE):
        state = RUNNING
    elif counts[FAILED]:
        state = DONE_WITH_FAILURES
    else:
        state = DONE
    return Summary(state, counts, done, total, rate)


class RateMeter:
    """Bytes per second between successive samples (the node's reports)."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None
        self.rate = 0.0

    def sample(self, now: float, done: int) -> float:
        if self._last is not None:
            t0, d0 = self._last
            if now > t0:
                self.rate = max(0.0, (done - d0) / (now - t0))
        self._last = (now, done)
        return self.rate
