"""Pre-caching an image on many nodes, with per-node progress the API keeps and serves.

``start`` checks the image (the caller's token; not active means the image service
refused or has not activated it: 400), records one row per target node (``skipped``
with the reason for a node that is down or not registered, ``queued`` for the rest)
and dispatches. Dispatch asks each node ``POST /v1/precache`` with the peers that
:func:`cowfleet.distribution.assign.assign_sources` chose for it; at most
``precache_concurrency`` nodes are active at once (0: every node at once). Nodes
report progress on ``/internal/nodes/{host}/precache/{id}``; a report that would move
a node's state backwards is ignored (:func:`cowfleet.precache.may_move`).

The sweep (every heartbeat interval) fails nodes that went down mid-fetch and asks
again nodes that were never reached or went quiet (the node's request is idempotent by
pre-cache id), so an API restart loses nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cowfleet import precache as pc
from cowfleet.api.db.models import NodeRow, PrecacheNodeRow, PrecacheRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.fleet import Fleet, rows
from cowfleet.api.nodes_client import NodeError
from cowfleet.distribution.assign import Holder, assign_sources

log = logging.getLogger(__name__)

_POLL = 0.2  # s between looks at the active count when concurrency is bounded


@dataclass(frozen=True)
class Target:
    """Which nodes a pre-cache covers: an aggregate's hosts, named hosts, or all."""

    kind: str  # "aggregate" | "hosts" | "all"
    hosts: tuple[str, ...]
    aggregate: int | None = None

    def to_json(self) -> dict[str, Any]:
        if self.kind == "aggregate":
            return {"aggregate": self.aggregate}
        if self.kind == "hosts":
            return {"hosts": list(self.hosts)}
        return {"all": True}


def down_reason(node: NodeRow | None, host: str, now: float, down_after: float) -> str | None:
    """Why ``host`` cannot take part (None: it can)."""
    if node is None:
        return f"host {host} is not a registered node"
    silent = now - node.last_heartbeat
    if silent > down_after:
        return f"node {host} is down: no heartbeat for {silent:.0f}s (down after {down_after:g}s)"
    return None


def node_view(r: PrecacheNodeRow) -> dict[str, Any]:
    return {
        "host": r.host,
        "state": r.state,
        "bytes_done": r.bytes_done,
        "bytes_total": r.bytes_total,
        "rate": r.rate,
        "source": r.source,
        "error": r.error,
        "updated_at": r.updated_at,
    }


def _progress(r: PrecacheNodeRow) -> pc.NodeProgress:
    return pc.NodeProgress(r.state, r.bytes_done, r.bytes_total, r.rate, r.source, r.error)


def view(p: PrecacheRow, nodes: Sequence[PrecacheNodeRow], *, detail: bool) -> dict[str, Any]:
    summary = pc.summarize(_progress(n) for n in nodes)
    out: dict[str, Any] = {
        "id": p.id,
        "image_id": p.image_id,
        "target": p.target,
        "concurrency": p.concurrency,
        "created_at": p.created_at,
        "state": summary.state,
        "counts": summary.counts,
        "bytes_done": summary.bytes_done,
        "bytes_total": summary.bytes_total,
        "rate": summary.rate,
    }
    if detail:
        out["nodes"] = [node_view(n) for n in nodes]
    return out


class Precaches:
    """Starts, dispatches, records and sweeps pre-caches (one per API process)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._dispatching: set[str] = set()
        self._lock = threading.Lock()

    # -- start -------------------------------------------------------------------------

    def start(self, image_id: str, target: Target, token: str) -> str:
        """Check the image, record the pre-cache and its nodes, dispatch; its id."""
        fleet = self.fleet
        image = fleet.images.get(image_id, token)
        if image.status != "active":
            raise ApiFault(
                400,
                f"Image {image_id} is {image.status or 'not active'}: the image service has "
                "not activated it (or its policy refused the data), so it cannot be cached.",
            )
        now = fleet.clock()
        pid = str(uuidlib.uuid4())
        down_after = fleet.settings.node_down_after
        with fleet.db.write() as s:
            nodes = {
                n.hostname: n
                for n in s.scalars(select(NodeRow).where(NodeRow.hostname.in_(target.hosts)))
            }
            s.add(
                PrecacheRow(
                    id=pid,
                    image_id=image.id or image_id,
                    target=target.to_json(),
                    concurrency=fleet.settings.precache_concurrency,
                    created_at=now,
                )
            )
            s.flush()
            for host in dict.fromkeys(target.hosts):
                why = down_reason(nodes.get(host), host, now, down_after)
                s.add(
                    PrecacheNodeRow(
                        precache_id=pid,
                        host=host,
                        state=pc.SKIPPED if why else pc.QUEUED,
                        bytes_done=0,
                        rate=0.0,
                        error=why,
                        sources=[],
                        updated_at=now,
                    )
                )
        log.info("pre-cache %s of image %s on %d nodes", pid, image_id, len(target.hosts))
        self.dispatch_soon(pid)
        return pid

    # -- dispatch ----------------------------------------------------------------------

    def dispatch_soon(self, pid: str) -> None:
        with self._lock:
            if pid in self._dispatching:
                return
            self._dispatching.add(pid)
        threading.Thread(target=self._dispatch, args=(pid,), name="precache", daemon=True).start()

    def _dispatch(self, pid: str) -> None:
        try:
            self.dispatch(pid)
        except Exception as exc:  # the sweep asks again
            log.error("pre-cache %s: dispatch failed: %s", pid, exc)
            log.debug("traceback", exc_info=True)
        finally:
            with self._lock:
                self._dispatching.discard(pid)

    def plan(self, s: Session, pid: str, hosts: Sequence[str]) -> dict[str, dict[str, Any]]:
        """What to send each of ``hosts``: its ``sources`` (peer host and URL, in order;
        none when ``peer_fanout`` is 0: every node fetches from the origin) and, when
        the plan is striped (``peer_stripes`` >= 2), the ``stripes`` (the sources of
        each stripe, see docs/fleet-protocol.md)."""
        settings = self.fleet.settings
        if settings.peer_fanout < 1:
            return {host: {"sources": []} for host in hosts}
        p = s.scalars(select(PrecacheRow).where(PrecacheRow.id == pid)).one()
        nodes = {n.hostname: n for n in s.scalars(select(NodeRow))}
        holders: dict[str, Holder] = {}
        for n in nodes.values():
            if any(
                isinstance(c, dict) and c.get("image_id") == p.image_id and c.get("verified")
                for c in n.cache or ()
            ):
                holders[n.hostname] = Holder(n.hostname, n.url, True)
        for host in s.scalars(
            select(PrecacheNodeRow.host)
            .join(PrecacheRow, PrecacheRow.id == PrecacheNodeRow.precache_id)
            .where(
                PrecacheRow.image_id == p.image_id,
                PrecacheNodeRow.state.in_((pc.FETCHING, pc.VERIFYING)),
            )
        ):
            if host not in holders and host in nodes:
                holders[host] = Holder(host, nodes[host].url, False)
        fetchers = [h for h in hosts if h not in holders or not holders[h].complete]
        striped = settings.peer_stripes > 1
        plans = assign_sources(
            p.image_id,
            fetchers,
            list(holders.values()),
            fanout=settings.peer_stripe_fanout if striped else settings.peer_fanout,
            stripes=settings.peer_stripes if striped else 1,
        )
        out: dict[str, dict[str, Any]] = {}

        def named(peers: Sequence[str], host: str) -> list[dict[str, str]]:
            return [
                {"host": peer, "url": nodes[peer].url}
                for peer in peers
                if peer in nodes and peer != host
            ]

        for host in hosts:
            plan = plans.get(host)
            out[host] = {"sources": named(plan.peers if plan else (), host)}
            stripes = [named(chain, host) for chain in plan.stripes] if plan else []
            if any(stripes):  # all from the origin: no stripes to name
                out[host]["stripes"] = stripes
        return out

    def dispatch(self, pid: str) -> None:
        """Ask every queued, not yet asked node of ``pid``, at most ``concurrency`` at once."""
        fleet = self.fleet
        with fleet.db.read() as s:
            p = s.scalars(select(PrecacheRow).where(PrecacheRow.id == pid)).one_or_none()
            if p is None:
                return
            limit = p.concurrency
            waiting = list(
                s.scalars(
                    select(PrecacheNodeRow.host)
                    .where(
                        PrecacheNodeRow.precache_id == pid,
                        PrecacheNodeRow.state == pc.QUEUED,
                        PrecacheNodeRow.dispatched_at.is_(None),
                    )
                    .order_by(PrecacheNodeRow.seq)
                )
            )
        if not waiting:
            return
        if limit <= 0:
            with fleet.db.read() as s:
                sources = self.plan(s, pid, waiting)
            for host in waiting:
                fleet.submit(self.ask, pid, host, sources[host])
            return
        for host in waiting:  # bounded: one at a time as slots free up
            while self.active(pid) >= limit:
                threading.Event().wait(_POLL)
            with fleet.db.read() as s:
                sources = self.plan(s, pid, [host])
            self.ask(pid, host, sources[host])

    def active(self, pid: str) -> int:
        with self.fleet.db.read() as s:
            return len(
                list(
                    s.scalars(
                        select(PrecacheNodeRow.seq).where(
                            PrecacheNodeRow.precache_id == pid,
                            PrecacheNodeRow.state.in_(tuple(pc.ACTIVE)),
                            PrecacheNodeRow.dispatched_at.is_not(None),
                        )
                    )
                )
            )

    def ask(self, pid: str, host: str, peers: dict[str, Any]) -> None:
        """Send one node its pre-cache request; a node that cannot be asked fails."""
        fleet = self.fleet
        now = fleet.clock()
        with fleet.db.write() as s:
            p = s.scalars(select(PrecacheRow).where(PrecacheRow.id == pid)).one()
            url = s.scalars(select(NodeRow.url).where(NodeRow.hostname == host)).one_or_none()
            s.execute(
                update(PrecacheNodeRow)
                .where(PrecacheNodeRow.precache_id == pid, PrecacheNodeRow.host == host)
                .values(dispatched_at=now, sources=peers["sources"])
            )
            image_id = p.image_id
        body = {"precache_id": pid, "image_id": image_id, **peers}
        try:
            if url is None:
                raise NodeError(f"host {host} is no longer registered")
            fleet.nodes.precache(url, body)
        except NodeError as exc:
            log.warning("pre-cache %s: node %s: %s", pid, host, exc)
            self.record(pid, host, pc.NodeProgress(pc.FAILED, error=str(exc)))

    # -- progress ----------------------------------------------------------------------

    def record(self, pid: str, host: str, prog: pc.NodeProgress) -> bool:
        """Apply a node's report; False when it was stale (a backwards move), ignored."""
        fleet = self.fleet
        with fleet.db.write() as s:
            found = s.execute(
                select(PrecacheNodeRow, PrecacheRow.image_id)
                .join(PrecacheRow, PrecacheRow.id == PrecacheNodeRow.precache_id)
                .where(PrecacheNodeRow.precache_id == pid, PrecacheNodeRow.host == host)
            ).one_or_none()
            if found is None:
                raise ApiFault(404, f"Pre-cache {pid} has no node {host}.")
            row, image_id = found
            if not pc.may_move(row.state, prog.state):
                return False
            total = prog.bytes_total if prog.bytes_total is not None else row.bytes_total
            done = s.execute(
                update(PrecacheNodeRow)
                .where(PrecacheNodeRow.seq == row.seq, PrecacheNodeRow.state == row.state)
                .values(
                    state=prog.state,
                    bytes_done=prog.bytes_done,
                    bytes_total=total,
                    rate=0.0 if prog.state in pc.TERMINAL else prog.rate,
                    source=prog.source,
                    error=prog.error,
                    updated_at=fleet.clock(),
                )
            )
            moved = rows(done) == 1
        if moved and fleet.metrics is not None:
            fleet.metrics.precache_progress(host, image_id, prog.bytes_done)
        return moved

    # -- reads -------------------------------------------------------------------------

    def show(self, pid: str) -> dict[str, Any]:
        with self.fleet.db.read() as s:
            p = s.scalars(select(PrecacheRow).where(PrecacheRow.id == pid)).one_or_none()
            if p is None:
                raise ApiFault(404, f"Pre-cache {pid[:64]} could not be found.")
            return view(p, self._nodes(s, pid), detail=True)

    def summaries(self, image_id: str | None = None) -> list[dict[str, Any]]:
        with self.fleet.db.read() as s:
            q = select(PrecacheRow).order_by(PrecacheRow.seq)
            if image_id:
                q = q.where(PrecacheRow.image_id == image_id)
            return [view(p, self._nodes(s, p.id), detail=False) for p in s.scalars(q)]

    @staticmethod
    def _nodes(s: Session, pid: str) -> list[PrecacheNodeRow]:
        return list(
            s.scalars(
                select(PrecacheNodeRow)
                .where(PrecacheNodeRow.precache_id == pid)
                .order_by(PrecacheNodeRow.host)
            )
        )

    # -- sweep -------------------------------------------------------------------------

    def sweep(self) -> None:
        """Fail nodes that went down mid-fetch; ask again the unreached and the quiet."""
        fleet = self.fleet
        now = fleet.clock()
        settings = fleet.settings
        grace = max(10 * settings.node_timeout, 60.0)
        with fleet.db.read() as s:
            nodes = {n.hostname: n for n in s.scalars(select(NodeRow))}
            active = list(
                s.scalars(
                    select(PrecacheNodeRow).where(PrecacheNodeRow.state.in_(tuple(pc.ACTIVE)))
                )
            )
        again: set[str] = set()
        for r in active:
            if r.dispatched_at is None:
                if now - r.updated_at > grace:
                    again.add(r.precache_id)
                continue
            why = down_reason(nodes.get(r.host), r.host, now, settings.node_down_after)
            if why is not None:
                self.record(
                    r.precache_id,
                    r.host,
                    pc.NodeProgress(pc.FAILED, r.bytes_done, r.bytes_total, error=why),
                )
            elif now - r.updated_at > grace:
                with fleet.db.write() as s:  # quiet: the node lost it (a restart); ask again
                    s.execute(
                        update(PrecacheNodeRow)
                        .where(PrecacheNodeRow.seq == r.seq, PrecacheNodeRow.state == r.state)
                        .values(state=pc.QUEUED, dispatched_at=None, updated_at=now)
                    )
                again.add(r.precache_id)
        for pid in again:
            self.dispatch_soon(pid)
