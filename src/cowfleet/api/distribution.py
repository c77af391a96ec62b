"""The compute API's side of peer fetching: which peers a build's node fetches from.

At dispatch time (``Fleet._dispatch``) the API knows, from the database, which nodes hold
the image (their last heartbeat's cache inventory: ``verified`` bases) and which are
fetching it now (servers of that image still spawning on a node). It places the node in
the tree :func:`cowfleet.distribution.assign.assign_sources` builds over them, the
fetchers in the order they were dispatched, and sends the chosen peers in the build
spec's ``sources`` (docs/fleet-protocol.md, "Peers"). Down nodes, the node itself and
peers reported for a bad piece of this image (:class:`PeerFlags`) are left out.

A flag is kept in memory (per API process) until the flagged node no longer lists the
image in its cache (its base was quarantined or removed: a new copy must be fetched and
verified again), or the API restarts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cowfleet.api import states
from cowfleet.api.db.models import NodeRow, ServerRow
from cowfleet.distribution.assign import Holder, assign_sources

log = logging.getLogger(__name__)


class PeerFlags:
    """(peer host, image id) pairs reported for a piece that failed the hash tree."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[tuple[str, str], str] = {}

    def flag(self, peer: str, image_id: str, reason: str, reporter: str) -> None:
        log.error(
            "node %s reports that peer %s sent a bad piece of image %s: %s",
            reporter,
            peer,
            image_id,
            reason,
        )
        with self._lock:
            self._flags[(peer, image_id)] = f"{reporter}: {reason}"

    def flagged(self, peer: str, image_id: str) -> bool:
        with self._lock:
            return (peer, image_id) in self._flags

    def clear(self, peer: str, image_id: str) -> None:
        with self._lock:
            self._flags.pop((peer, image_id), None)

    def all(self) -> dict[tuple[str, str], str]:
        with self._lock:
            return dict(self._flags)


def _cached(node: NodeRow, image_id: str) -> bool | None:
    """True: a verified base; False: a base not verified; None: absent."""
    for c in node.cache or ():
        if isinstance(c, dict) and c.get("image_id") == image_id:
            return bool(c.get("verified"))
    return None


def peer_plan(
    session: Session,
    image_id: str,
    host: str,
    *,
    fanout: int,
    now: float,
    down_after: float,
    flags: PeerFlags,
    stripes: int = 1,
    stripe_fanout: int = 3,
) -> dict[str, Any]:
    """The build spec's fields for ``host``'s fetch of ``image_id``: ``sources`` (absent
    or empty: the origin only) and, with ``stripes`` >= 2, the ``stripes`` (the sources
    of each stripe, planned with ``stripe_fanout`` per stripe tree)."""
    if fanout < 1:
        return {}
    nodes = {n.hostname: n for n in session.scalars(select(NodeRow))}
    alive = {h for h, n in nodes.items() if now - n.last_heartbeat <= down_after}
    holders: list[Holder] = []
    for h in sorted(alive):
        state = _cached(nodes[h], image_id)
        if flags.flagged(h, image_id):
            if state is None:
                flags.clear(h, image_id)  # its base is gone: a new one will be verified
            continue
        if state:
            holders.append(Holder(h, nodes[h].url, True))
    complete = {x.host for x in holders}
    fetching: list[str] = []
    for srv_host in session.scalars(
        select(ServerRow.host)
        .where(
            ServerRow.image_id == image_id,
            ServerRow.deleted.is_(False),
            ServerRow.vm_state == states.BUILDING,
            ServerRow.task_state == states.SPAWNING,
            ServerRow.host.is_not(None),
        )
        .order_by(ServerRow.updated_at, ServerRow.id)
    ):
        if (
            srv_host is None
            or srv_host == host
            or srv_host in complete
            or srv_host not in alive
            or srv_host in fetching
            or flags.flagged(srv_host, image_id)
        ):
            continue
        fetching.append(srv_host)
        holders.append(Holder(srv_host, nodes[srv_host].url, False))
    if host in complete:
        return {}
    striped = stripes > 1
    plan = assign_sources(
        image_id,
        [*fetching, host],
        holders,
        fanout=stripe_fanout if striped else fanout,
        stripes=stripes if striped else 1,
    )[host]
    out: dict[str, Any] = {}
    if plan.peers:
        out["sources"] = [{"host": p, "url": nodes[p].url} for p in plan.peers]
    if plan.stripes and any(plan.stripes):  # all from the origin: no stripes to name
        out["stripes"] = [[{"host": p, "url": nodes[p].url} for p in c] for c in plan.stripes]
    return out
