"""Host weighers: each scores hosts, normalised to [0, 1] across the candidates.

The total weight of a host is the sum of each weigher's normalised score times its
multiplier (as in Nova): the cache weigher adds ``Weighing.cache`` to a host that
holds the image (or is already building from it); the RAM weigher adds up to
``Weighing.ram`` for the most free RAM when spreading, the least when packing.
"""

from __future__ import annotations

from collections.abc import Sequence

from cowfleet.scheduler.model import HostState, Ratios, Request, Weighing


def normalise(values: Sequence[float]) -> list[float]:
    """``values`` scaled to [0, 1] (all equal: all 0)."""
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def cache_scores(hosts: Sequence[HostState], req: Request) -> list[float]:
    return [1.0 if req.image_id in h.images else 0.0 for h in hosts]


def ram_scores(hosts: Sequence[HostState], ratios: Ratios, mode: str) -> list[float]:
    free = [h.free_ram_mb(ratios) for h in hosts]
    return [-f for f in free] if mode == "pack" else free


def weigh(
    hosts: Sequence[HostState], req: Request, ratios: Ratios, weighing: Weighing
) -> list[dict[str, float]]:
    """Each host's weighted scores by weigher name (same order as ``hosts``)."""
    cache = [s * weighing.cache for s in cache_scores(hosts, req)]
    ram = [s * weighing.ram for s in normalise(ram_scores(hosts, ratios, weighing.mode))]
    return [{"cache": c, "ram": r} for c, r in zip(cache, ram, strict=True)]
