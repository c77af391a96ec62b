"""Source assignment for nodes fetching an image (stub: every node fetches from the origin).

The real module comes from the i16-peers branch; this stub has its interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    host: str  # node hostname
    url: str  # the node agent's base URL (as registered)
    complete: bool  # True: cached and verified; False: fetching now


@dataclass(frozen=True)
class SourcePlan:
    host: str
    peers: tuple[str, ...]  # peer hostnames to try in order; the origin is always the last resort


def assign_sources(
    image_id: str, fetchers: Sequence[str], holders: Sequence[Holder], *, fanout: int
) -> dict[str, SourcePlan]:
    return {h: SourcePlan(h, ()) for h in fetchers}  # stub: origin only
