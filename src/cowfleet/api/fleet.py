"""The compute API's behaviour behind the routes: servers, placement, builds, actions.

Everything lives in the database; the only in-process things are the pool of threads
that talk to node agents and a periodic sweep, both of which any replica can lose
without harm: a build whose dispatcher died is picked up again by the sweep of any
replica, and each step re-checks the record with a conditional UPDATE.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from cowfleet.api import states
from cowfleet.api.db.engine import Database
from cowfleet.api.db.models import FlavorRow, NodeRow, ServerRow
from cowfleet.api.distribution import PeerFlags, peer_plan
from cowfleet.api.faults import ApiFault
from cowfleet.api.images import ImageInfo, ImageLookup
from cowfleet.api.nodes_client import NodeConflict, NodeError, NodesClient
from cowfleet.api.settings import ApiSettings
from cowfleet.logs import carry
from cowfleet.metrics import NO_VALID_HOST as NO_VALID_HOST_OUTCOME
from cowfleet.metrics import PLACED, ApiMetrics
from cowfleet.scheduler.claims import need_of, release, try_claim
from cowfleet.scheduler.model import Candidate, HostState, Request, Selection
from cowfleet.scheduler.select import select as select_hosts

log = logging.getLogger(__name__)

Clock = Callable[[], float]

NO_VALID_HOST = "No valid host was found."
# Rounds of (snapshot, select, claim) before giving up when every claim races and loses.
_CLAIM_ROUNDS = 20


def rows(result: object) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


@dataclass(frozen=True)
class CreateRequest:
    name: str
    image_id: str
    flavor_ref: str
    min_count: int = 1
    max_count: int = 1


def flavor_snapshot(f: FlavorRow) -> dict[str, Any]:
    """What a server keeps of its flavor (Nova's embedded flavor, plus the id)."""
    return {
        "id": f.id,
        "original_name": f.name,
        "vcpus": f.vcpus,
        "ram": f.ram_mb,
        "disk": f.root_gb,
        "ephemeral": f.ephemeral_gb,
        "swap": f.swap_mb,
        "extra_specs": dict(f.extra_specs or {}),
    }


class Fleet:
    def __init__(
        self,
        db: Database,
        settings: ApiSettings,
        images: ImageLookup,
        nodes: NodesClient,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.db = db
        self.settings = settings
        self.images = images
        self.nodes = nodes
        self.clock = clock
        self._pool = ThreadPoolExecutor(settings.build_workers, thread_name_prefix="dispatch")
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self.metrics: ApiMetrics | None = None  # set by create_app
        self.peer_flags = PeerFlags()  # peers reported for bad pieces (api.distribution)
        self.watching: set[str] = set()  # servers whose snapshot this process follows

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- background work -------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # a background step must never kill its worker
                log.error("background step %s failed: %s", fn.__name__, exc)
                log.debug("traceback", exc_info=True)

        try:
            self._pool.submit(carry(run))  # the request's id goes along
        except RuntimeError:  # shutting down: the sweep of any replica picks it up
            log.info("not submitting %s: shutting down", fn.__name__)

    def _queue_schedule(self, server_id: str) -> None:
        with self._queued_lock:
            if server_id in self._queued:
                return
            self._queued.add(server_id)
        self.submit(self.schedule, server_id)

    # -- servers ---------------------------------------------------------------------

    def flavor_by_ref(self, session: Session, ref: str) -> FlavorRow | None:
        ref = ref.rstrip("/").rsplit("/", 1)[-1]
        return session.scalars(select(FlavorRow).where(FlavorRow.id == ref)).one_or_none()

    def create_servers(self, project: str, token: str, req: CreateRequest) -> list[ServerRow]:
        with self.db.read() as s:
            flavor = self.flavor_by_ref(s, req.flavor_ref)
            if flavor is None:
                raise ApiFault(400, f"Flavor {req.flavor_ref} could not be found.")
            snap = flavor_snapshot(flavor)
        image = self.images.get(req.image_id, token)
        _check_image(image, snap)
        now = self.clock()
        created: list[ServerRow] = []
        with self.db.write() as s:
            for index in range(req.max_count):
                name = req.name if req.max_count == 1 else f"{req.name}-{index + 1}"
                row = ServerRow(
                    id=str(uuidlib.uuid4()),
                    name=name,
                    project_id=project,
                    image_id=image.id or req.image_id,
                    image_props=dict(image.props),
                    flavor_id=snap["id"],
                    flavor=snap,
                    vm_state=states.BUILDING,
                    task_state=states.SCHEDULING,
                    power_state=states.NOSTATE,
                    attempts=0,
                    tried_hosts=[],
                    deleted=False,
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                created.append(row)
        ids = [row.id for row in created]
        if req.min_count > 1:
            held = self._claim_minimum(ids[: req.min_count])
            if held is None:
                message = (
                    f"{NO_VALID_HOST} There are not enough hosts available: fewer than "
                    f"min_count={req.min_count} servers of this request fit."
                )
                for server_id in ids:
                    self._fail(server_id, message)  # gives back the claims taken so far
                return created
            for server_id, cand, sel in held:
                self.submit(self._dispatch_held, server_id, cand, sel)
            ids = ids[req.min_count :]
        for server_id in ids:
            self._queue_schedule(server_id)
        return created

    def _claim_minimum(self, ids: list[str]) -> list[tuple[str, Candidate, Selection]] | None:
        """Claims for all of ``ids`` (a request's first ``min_count`` servers), or None.

        Nova's ``min_count``: when fewer than that many servers can be placed, the
        request fails as a whole (every server of it ends in ERROR, no valid host).
        The claims are taken here, before any build, so two requests racing for the
        last room cannot both get half of what they need. Claims already taken stay
        held on None: the caller fails the servers, which gives them back.
        """
        held: list[tuple[str, Candidate, Selection]] = []
        for server_id in ids:
            got: tuple[str, Candidate, Selection] | None = None
            for _ in range(_CLAIM_ROUNDS):
                with self.db.read() as s:
                    row = s.scalars(select(ServerRow).where(ServerRow.id == server_id)).one()
                    need = need_of(row.flavor)
                    req = Request(need, row.image_id, dict(row.image_props or {}), frozenset())
                    snapshot = self.host_states(s)
                sel = select_hosts(req, snapshot, self.settings.ratios, self.settings.weighing)
                if not sel.candidates:
                    break
                chosen = self._claim_first(server_id, sel, need)
                if isinstance(chosen, Candidate):
                    got = (server_id, chosen, sel)
                    break
                if chosen == "taken":
                    break
            if got is None:
                return None
            held.append(got)
        return held

    def _dispatch_held(self, server_id: str, cand: Candidate, sel: Selection) -> None:
        """Build a server whose claim its request took; a failed build is placed anew."""
        if self._dispatch(server_id, cand, sel) == "retry":
            self.schedule(server_id)

    def visible(self, session: Session, server_id: str, project: str, admin: bool) -> ServerRow:
        """The server, or a 404 alike for a missing one and another project's."""
        row = session.scalars(
            select(ServerRow).where(ServerRow.id == server_id, ServerRow.deleted.is_(False))
        ).one_or_none()
        if row is None or (not admin and row.project_id != project):
            raise ApiFault(404, f"Instance {server_id} could not be found.")
        return row

    def delete_server(self, server_id: str, project: str, admin: bool) -> None:
        now = self.clock()
        with self.db.write() as s:
            row = self.visible(s, server_id, project, admin)
            host = row.host
            s.execute(
                update(ServerRow)
                .where(ServerRow.id == server_id)
                .values(deleted=True, task_state="deleting", deleted_at=now, updated_at=now)
            )
            if host is None:
                release(s, server_id)
        if host is not None:
            self.submit(self._delete_on_node, server_id, host)

    def _delete_on_node(self, server_id: str, host: str) -> None:
        url = self._node_url(host)
        if url is None:
            return
        try:
            gone = self.nodes.delete(url, server_id)
        except NodeError as exc:
            log.warning(
                "delete of %s on %s failed (the next heartbeat retries): %s", server_id, host, exc
            )
            return
        if gone:
            with self.db.write() as s:
                row = s.scalars(select(ServerRow).where(ServerRow.id == server_id)).one_or_none()
                # Only a deleted server's claim, or a claim left on a host it moved from.
                if row is not None and (row.deleted or row.host != host):
                    release(s, server_id, only_on=host)

    def _node_url(self, host: str) -> str | None:
        with self.db.read() as s:
            return s.scalars(select(NodeRow.url).where(NodeRow.hostname == host)).one_or_none()

    def action(self, server_id: str, project: str, admin: bool, action: str, kind: str) -> None:
        """Start, stop or reboot: 409 unless the state allows it; the node call runs behind."""
        allowed = {
            "start": (states.STOPPED,),
            "stop": (states.ACTIVE, states.ERROR),
            "reboot": (states.ACTIVE,)
            if kind == "SOFT"
            else (states.ACTIVE, states.STOPPED, states.ERROR),
        }[action]
        task = {
            "start": states.POWERING_ON,
            "stop": states.POWERING_OFF,
            "reboot": states.REBOOTING if kind == "SOFT" else states.REBOOTING_HARD,
        }[action]
        with self.db.write() as s:
            row = self.visible(s, server_id, project, admin)
            if row.task_state is not None:
                raise ApiFault(
                    409,
                    f"Cannot '{action}' instance {server_id} while it is in "
                    f"task_state {row.task_state}",
                )
            if row.vm_state not in allowed or row.host is None:
                raise ApiFault(
                    409,
                    f"Cannot '{action}' instance {server_id} while it is in "
                    f"vm_state {row.vm_state}",
                )
            s.execute(
                update(ServerRow)
                .where(ServerRow.id == server_id)
                .values(task_state=task, updated_at=self.clock())
            )
            host = row.host
        self.submit(self._run_action, server_id, host, action, kind, task)

    def _run_action(self, server_id: str, host: str, action: str, kind: str, task: str) -> None:
        url = self._node_url(host)
        values: dict[str, Any] = {"task_state": None, "updated_at": self.clock()}
        try:
            if url is None:
                raise NodeError(f"host {host} is not registered")
            self.nodes.action(url, server_id, action, kind if action == "reboot" else None)
            vm, power = states.FROM_NODE[states.TASK_TARGET[task]]
            values.update(vm_state=vm, power_state=power)
        except NodeConflict as exc:
            log.info("%s of %s refused by its node: %s", action, server_id, exc)
        except NodeError as exc:
            log.warning("%s of %s failed: %s", action, server_id, exc)
        with self.db.write() as s:
            s.execute(
                update(ServerRow)
                .where(ServerRow.id == server_id, ServerRow.task_state == task)
                .values(**values)
            )

    # -- placement and builds --------------------------------------------------------

    def host_states(self, session: Session) -> list[HostState]:
        """The scheduler's snapshot: every node, its usage, and the images on it."""
        now = self.clock()
        incoming: dict[str, set[str]] = {}
        # A claim counts as much as a placement: a server that holds a claim on a host
        # fetches its image there next, so the servers of one request scheduled at once
        # follow each other (none of them sees a host that only its sibling claimed as
        # fuller and cache-less).
        where = func.coalesce(ServerRow.host, ServerRow.claim_host)
        for host, image in session.execute(
            select(where, ServerRow.image_id)
            .where(ServerRow.deleted.is_(False), where.is_not(None))
            .distinct()
        ):
            if host is not None:
                incoming.setdefault(host, set()).add(image)
        out = []
        for n in session.scalars(select(NodeRow)):
            cached = {
                str(c.get("image_id"))
                for c in n.cache or ()
                if isinstance(c, dict) and c.get("state") != "quarantined"  # not a cache hit
            }
            out.append(
                HostState(
                    hostname=n.hostname,
                    enabled=n.enabled,
                    alive=now - n.last_heartbeat <= self.settings.node_down_after,
                    hypervisor_type=n.hypervisor_type,
                    vcpus=n.vcpus,
                    ram_mb=n.ram_mb,
                    disk_gb=n.disk_gb,
                    vcpus_used=n.vcpus_used,
                    ram_used_mb=n.ram_used_mb,
                    disk_used_gb=n.disk_used_gb,
                    arch=n.arch,
                    images=frozenset(cached | incoming.get(n.hostname, set())),
                )
            )
        return out

    def schedule(self, server_id: str) -> None:
        """Place the server, claim, dispatch; retry on the next host; ERROR at the end."""
        with self._queued_lock:
            self._queued.discard(server_id)
        for _ in range(_CLAIM_ROUNDS):
            with self.db.read() as s:
                row = s.scalars(select(ServerRow).where(ServerRow.id == server_id)).one_or_none()
                if row is None or row.deleted or row.vm_state != states.BUILDING or row.host:
                    return
                need = need_of(row.flavor)
                req = Request(
                    need,
                    row.image_id,
                    dict(row.image_props or {}),
                    frozenset(row.tried_hosts or ()),
                )
                snapshot = self.host_states(s)
            sel = select_hosts(req, snapshot, self.settings.ratios, self.settings.weighing)
            if not sel.candidates:
                self._decided(NO_VALID_HOST_OUTCOME)
                self._fail(server_id, f"{NO_VALID_HOST} {sel.why_none()}")
                return
            chosen = self._claim_first(server_id, sel, need)
            if chosen is None:
                continue  # every claim lost a race: look again
            if chosen == "taken":
                return  # another dispatcher holds this server's claim
            assert isinstance(chosen, Candidate)
            outcome = self._dispatch(server_id, chosen, sel)
            if outcome != "retry":
                return
        self._decided(NO_VALID_HOST_OUTCOME)
        self._fail(server_id, f"{NO_VALID_HOST} The hosts filled up while this server waited.")

    def _decided(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.decision(outcome)

    def _claim_first(self, server_id: str, sel: Selection, need: Any) -> Candidate | str | None:
        for cand in sel.candidates:
            if try_claim(self.db, server_id, cand.hostname, need, self.settings.ratios):
                return cand
            with self.db.read() as s:
                holder = s.scalars(
                    select(ServerRow.claim_host).where(ServerRow.id == server_id)
                ).one_or_none()
            if holder is not None:
                return "taken"
        return None

    def _dispatch(self, server_id: str, cand: Candidate, sel: Selection) -> str:
        now = self.clock()
        with self.db.write() as s:
            row = s.scalars(select(ServerRow).where(ServerRow.id == server_id)).one()
            placement = {
                "host": cand.hostname,
                "attempt": row.attempts + 1,
                "weight": cand.weight,
                "weights": dict(cand.weights),
                "filters": list(sel.filters),
                "hosts_considered": sel.considered,
                "hosts_passed": len(sel.candidates),
                "image_on_host": cand.weights.get("cache", 0.0) > 0,
            }
            placed = s.execute(
                update(ServerRow)
                .where(
                    ServerRow.id == server_id,
                    ServerRow.claim_host == cand.hostname,
                    ServerRow.deleted.is_(False),
                    ServerRow.host.is_(None),
                )
                .values(
                    host=cand.hostname,
                    task_state=states.SPAWNING,
                    attempts=ServerRow.attempts + 1,
                    placement=placement,
                    updated_at=now,
                    deadline=now + self.settings.build_timeout,
                )
            )
            if rows(placed) != 1:
                release(s, server_id)
                return "done"
            spec: dict[str, Any] = {
                "uuid": row.id,
                "name": row.name,
                "project_id": row.project_id,
                "image_id": row.image_id,
                "flavor": {
                    "name": row.flavor["original_name"],
                    "vcpus": row.flavor["vcpus"],
                    "ram_mb": row.flavor["ram"],
                    "root_gb": row.flavor["disk"],
                    "ephemeral_gb": row.flavor.get("ephemeral", 0),
                    "swap_mb": row.flavor.get("swap", 0),
                },
            }
            url = s.scalars(select(NodeRow.url).where(NodeRow.hostname == cand.hostname)).one()
            # Peers that hold the image or are fetching it (docs/fleet-protocol.md): the
            # spec's "sources" and, for a striped plan, "stripes".
            spec.update(
                peer_plan(
                    s,
                    row.image_id,
                    cand.hostname,
                    fanout=self.settings.peer_fanout,
                    now=now,
                    down_after=self.settings.node_down_after,
                    flags=self.peer_flags,
                    stripes=self.settings.peer_stripes,
                    stripe_fanout=self.settings.peer_stripe_fanout,
                )
            )
        log.info("server %s placed on %s (weight %s)", server_id, cand.hostname, cand.weight)
        self._decided(PLACED)
        try:
            instance = self.nodes.build(url, spec)
        except NodeError as exc:
            log.warning("build of %s on %s failed: %s", server_id, cand.hostname, exc)
            # The node may have started it before failing: deleting is harmless if not.
            return self.reschedule(server_id, cand.hostname, str(exc), delete_on_node=True)
        state = instance.get("state")
        if state == "ERROR":
            cause = str(instance.get("fault") or f"the build failed on {cand.hostname}")
            return self.reschedule(server_id, cand.hostname, cause, delete_on_node=True)
        if state in ("ACTIVE", "SHUTOFF"):
            self.apply_state(server_id, states.BUILDING, str(state), clear_task=True)
        return "done"

    def apply_state(
        self,
        server_id: str,
        seen_vm: str,
        node_state: str,
        *,
        clear_task: bool,
        fault: str | None = None,
    ) -> bool:
        vm, power = states.FROM_NODE[node_state]
        now = self.clock()
        values: dict[str, Any] = {"vm_state": vm, "power_state": power, "updated_at": now}
        if clear_task:
            values["task_state"] = None
        if seen_vm == states.BUILDING and vm != states.BUILDING:
            values.update(launched_at=now, deadline=None)
        if vm == states.ERROR:
            values["fault"] = self._fault_doc(fault or "the instance failed", now)
        with self.db.write() as s:
            done = s.execute(
                update(ServerRow)
                .where(
                    ServerRow.id == server_id,
                    ServerRow.vm_state == seen_vm,
                    ServerRow.deleted.is_(False),
                )
                .values(**values)
            )
            return rows(done) == 1

    def reschedule(
        self, server_id: str, host: str, cause: str, *, delete_on_node: bool, queue: bool = False
    ) -> str:
        """Take the server off ``host`` (releasing its claim); "retry" if attempts remain.

        Returns "retry" (the caller, or the queue when ``queue``, places it again),
        "error" (attempts used up: ERROR with the cause), or "lost" (someone else moved
        it first).
        """
        now = self.clock()
        with self.db.write() as s:
            row = s.scalars(select(ServerRow).where(ServerRow.id == server_id)).one_or_none()
            if row is None or row.host != host or row.vm_state != states.BUILDING or row.deleted:
                return "lost"
            tried = [*(row.tried_hosts or []), host]
            exhausted = row.attempts >= self.settings.build_attempts
            values: dict[str, Any] = {
                "host": None,
                "tried_hosts": tried,
                "updated_at": now,
                "deadline": None,
                "task_state": states.SCHEDULING,
            }
            if exhausted:
                values.update(
                    vm_state=states.ERROR,
                    task_state=None,
                    fault=self._fault_doc(
                        f"{NO_VALID_HOST} Build failed on {row.attempts} host(s) "
                        f"(the limit is {self.settings.build_attempts}); last: {cause}",
                        now,
                    ),
                )
            moved = s.execute(
                update(ServerRow)
                .where(
                    ServerRow.id == server_id,
                    ServerRow.host == host,
                    ServerRow.vm_state == states.BUILDING,
                )
                .values(**values)
            )
            if rows(moved) != 1:
                return "lost"
            release(s, server_id)
        if delete_on_node:
            self.submit(self._delete_on_node, server_id, host)
        if exhausted:
            return "error"
        if queue:
            self._queue_schedule(server_id)
        return "retry"

    def _fail(self, server_id: str, message: str) -> None:
        now = self.clock()
        with self.db.write() as s:
            s.execute(
                update(ServerRow)
                .where(
                    ServerRow.id == server_id,
                    ServerRow.vm_state == states.BUILDING,
                    ServerRow.host.is_(None),
                )
                .values(
                    vm_state=states.ERROR,
                    task_state=None,
                    fault=self._fault_doc(message, now),
                    updated_at=now,
                    deadline=None,
                )
            )
            release(s, server_id)
        log.warning("server %s: %s", server_id, message)

    @staticmethod
    def _fault_doc(message: str, now: float) -> dict[str, Any]:
        return {"code": 500, "message": message, "created": now}

    # -- sweep -----------------------------------------------------------------------

    def sweep(self) -> None:
        """Pick up builds nobody is placing, builds on dead nodes, and stuck actions."""
        now = self.clock()
        grace = max(10 * self.settings.node_timeout, 60.0)
        with self.db.read() as s:
            dead = {
                n.hostname
                for n in s.scalars(select(NodeRow))
                if now - n.last_heartbeat > self.settings.node_down_after
            }
            building = list(
                s.execute(
                    select(
                        ServerRow.id, ServerRow.host, ServerRow.updated_at, ServerRow.deadline
                    ).where(ServerRow.deleted.is_(False), ServerRow.vm_state == states.BUILDING)
                )
            )
            stuck = list(
                s.scalars(
                    select(ServerRow.id).where(
                        ServerRow.deleted.is_(False),
                        ServerRow.vm_state != states.BUILDING,
                        ServerRow.task_state.is_not(None),
                        # a snapshot is a lease's business (api/snapshots.py: recover)
                        ServerRow.task_state.not_in(("image_snapshot", "image_uploading")),
                        ServerRow.updated_at < now - grace,
                    )
                )
            )
        for server_id, host, updated_at, deadline in building:
            if host is None:
                with self._queued_lock:
                    queued = server_id in self._queued
                if not queued and now - updated_at > grace:
                    self._queue_schedule(server_id)
            elif host in dead:
                self.reschedule(
                    server_id,
                    host,
                    f"host {host} stopped heartbeating",
                    delete_on_node=True,
                    queue=True,
                )
            elif deadline is not None and now > deadline:
                self.reschedule(
                    server_id,
                    host,
                    f"the build on {host} passed its deadline",
                    delete_on_node=True,
                    queue=True,
                )
        if stuck:
            with self.db.write() as s:
                s.execute(
                    update(ServerRow)
                    .where(ServerRow.id.in_(stuck), ServerRow.updated_at < now - grace)
                    .values(task_state=None, updated_at=now)
                )


def _check_image(image: ImageInfo, flavor: dict[str, Any]) -> None:
    if image.status != "active":
        raise ApiFault(400, f"Image {image.id} is not active.")
    if flavor["disk"] and image.min_disk > flavor["disk"]:
        raise ApiFault(
            400,
            f"Flavor's disk is too small for requested image: the flavor has "
            f"{flavor['disk']} GiB, the image needs {image.min_disk} GiB.",
        )
    if image.min_ram > flavor["ram"]:
        raise ApiFault(
            400,
            f"Flavor's memory is too small for requested image: the flavor has "
            f"{flavor['ram']} MiB, the image needs {image.min_ram} MiB.",
        )
