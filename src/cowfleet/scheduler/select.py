"""``select(request, hosts)``: the hosts that can take a request, best first (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from cowfleet.scheduler.filters import FILTERS
from cowfleet.scheduler.model import Candidate, HostState, Ratios, Request, Selection, Weighing
from cowfleet.scheduler.weighers import weigh

DEFAULT_RATIOS = Ratios()
DEFAULT_WEIGHING = Weighing()


def select(
    req: Request,
    hosts: Sequence[HostState],
    ratios: Ratios = DEFAULT_RATIOS,
    weighing: Weighing = DEFAULT_WEIGHING,
) -> Selection:
    """Filter, then weigh; ties go to the host name that sorts first (stable, repeatable)."""
    rejected = {name: 0 for name, _ in FILTERS}
    passing: list[HostState] = []
    for host in hosts:
        for name, check in FILTERS:
            if not check(host, req, ratios):
                rejected[name] += 1
                break
        else:
            passing.append(host)
    scored = weigh(passing, req, ratios, weighing)
    candidates = [
        Candidate(h.hostname, round(sum(w.values()), 9), w)
        for h, w in zip(passing, scored, strict=True)
    ]
    candidates.sort(key=lambda c: (-c.weight, c.hostname))
    return Selection(
        candidates=tuple(candidates),
        rejected=rejected,
        filters=tuple(name for name, _ in FILTERS),
        considered=len(hosts),
    )
