"""``createImage``: a server's root disk into a new image, made by the server's node.

The API checks the server (404 another project's, 409 a wrong state or a snapshot
already running), creates the image in the image service *with the caller's token*
(``queued``, owned by the server's project, Nova's snapshot properties), marks the
server ``task_state=image_snapshot`` with a conditional UPDATE (so two requests
cannot both win), and answers. Behind the answer a worker asks the node to stream
the disk into the image (``POST /v1/servers/{id}/snapshot``, the caller's token
passed on: only the owner may upload an image's data), follows the node's job until
it ends, deletes the image if it failed, and clears the task state. The image goes
``queued`` -> ``saving`` (the node's upload) -> ``active``.

The watcher holds a lease in the server's row (``task_lease``, with the image in
``snapshot_image_id``) and renews it while it follows the job. When the process that
accepted the request dies (an API restart, a lost replica), the lease runs out and
:func:`recover`, called by the periodic sweep of any replica, takes the snapshot over
with a conditional UPDATE (one replica wins), follows the node's job and finishes it:
``done`` clears the task; ``failed``, or a node with no such job (unless the image
is already ``active``: the node restarted after it finished), deletes the image and
clears the task.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update

from cowfleet.api import states
from cowfleet.api.context import Ctx
from cowfleet.api.db.models import ServerRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.fleet import Fleet, rows
from cowfleet.api.names import check_name
from cowfleet.api.nodes_client import NodeConflict, NodeError

log = logging.getLogger(__name__)

SNAPSHOTTING, UPLOADING = "image_snapshot", "image_uploading"
POLL = 0.5  # seconds between two looks at the node's job
NODE_LOST_AFTER = 120  # seconds of failed looks before the job counts as lost
WATCHED = (SNAPSHOTTING, UPLOADING)
LEASE = 30.0  # seconds a watcher's lease lasts; renewed every third of it
TAKEN = "taken"  # outcome: another watcher (another replica's sweep) took the job over
# Properties of the source image a snapshot keeps (Nova keeps the image's metadata).
INHERITED = ("kernel_id", "ramdisk_id", "os_command_line")
INHERITED_PREFIXES = ("hw_",)
INHERITED_EXTRA = ("hypervisor_type", "architecture", "os_distro", "os_type", "os_version")


def parse(arg: Any) -> tuple[str, dict[str, str]]:
    """The image name and metadata of a ``createImage`` body (400 naming the problem)."""
    if not isinstance(arg, dict):
        raise ApiFault(400, "Invalid input for field 'createImage': must be an object.")
    unknown = set(arg) - {"name", "metadata"}
    if unknown:
        raise ApiFault(400, f"Invalid input for field 'createImage': unknown {sorted(unknown)}.")
    name = check_name(arg.get("name"))
    meta = arg.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and 0 < len(k) <= 255 and isinstance(v, str) and len(v) <= 255
        for k, v in meta.items()
    ):
        raise ApiFault(
            400,
            "Invalid input for field 'metadata': keys and values must be strings of at most "
            "255 characters.",
        )
    return name, dict(meta)


def _properties(
    row: ServerRow, name: str, meta: dict[str, str], source: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if source:
        for key, value in source.items():
            if value in (None, ""):
                continue
            if key in INHERITED or key in INHERITED_EXTRA or key.startswith(INHERITED_PREFIXES):
                body[key] = str(value)
        body["min_disk"] = int(source.get("min_disk") or 0)
        body["min_ram"] = int(source.get("min_ram") or 0)
    body.update(meta)
    body.update(
        name=name,
        visibility="private",
        owner=row.project_id,
        image_type="snapshot",
        instance_uuid=row.id,
        base_image_ref=row.image_id,
    )
    return body


def create(fleet: Fleet, ctx: Ctx, server_id: str, arg: Any) -> str:
    """Start a snapshot of ``server_id``; the new image's id."""
    name, meta = parse(arg)
    with fleet.db.read() as s:
        row = s.scalars(select(ServerRow).where(ServerRow.id == server_id)).one_or_none()
        if row is None or (not ctx.is_admin and row.project_id != ctx.project):
            raise ApiFault(404, f"Instance {server_id} could not be found.")
        vm_state = states.DELETED if row.deleted else row.vm_state
        if vm_state not in (states.ACTIVE, states.STOPPED) or row.host is None:
            raise ApiFault(
                409,
                f"Cannot 'createImage' instance {server_id} while it is in vm_state {vm_state}",
            )
        if row.task_state is not None:
            raise ApiFault(
                409,
                f"Cannot 'createImage' instance {server_id} while it is in "
                f"task_state {row.task_state}",
            )
        s.expunge(row)
    host = row.host
    source = fleet.images.doc(row.image_id, ctx.token)
    doc = fleet.images.create_image(_properties(row, name, meta, source), ctx.token)
    image_id = str(doc.get("id", ""))
    if not image_id:
        raise ApiFault(503, "The image service created an image without an id.")
    lease = fleet.clock() + LEASE
    with fleet.db.write() as s:
        won = rows(
            s.execute(
                update(ServerRow)
                .where(
                    ServerRow.id == server_id,
                    ServerRow.deleted.is_(False),
                    ServerRow.task_state.is_(None),
                    ServerRow.vm_state.in_((states.ACTIVE, states.STOPPED)),
                )
                .values(
                    task_state=SNAPSHOTTING,
                    snapshot_image_id=image_id,
                    task_lease=lease,
                    updated_at=fleet.clock(),
                )
            )
        )
    if not won:
        fleet.images.delete_image(image_id, ctx.token)
        raise ApiFault(
            409, f"Cannot 'createImage' instance {server_id}: another task started first."
        )
    fleet.watching.add(server_id)
    fleet.submit(run, fleet, server_id, host, image_id, ctx.token, Lease(fleet, server_id, lease))
    return image_id


class Lease:
    """This process's lease on a server's snapshot: renewed only while still its own.

    The lease's expiry doubles as its owner's mark: a renewal or a takeover is a
    conditional UPDATE on the value last written, so two watchers never both hold it.
    """

    def __init__(self, fleet: Fleet, server_id: str, value: float | None) -> None:
        self.fleet, self.server_id, self.value = fleet, server_id, value
        self.renewed = fleet.clock()

    def _mine(self) -> ColumnElement[bool]:
        if self.value is None:
            return ServerRow.task_lease.is_(None)
        return ServerRow.task_lease == self.value

    def renew(self, *, force: bool = False) -> bool:
        """Push the expiry on (at most every third of the lease unless ``force``);
        False when the snapshot is no longer this watcher's."""
        now = self.fleet.clock()
        if not force and now - self.renewed < LEASE / 3:
            return True
        value = now + LEASE
        with self.fleet.db.write() as s:
            won = rows(
                s.execute(
                    update(ServerRow)
                    .where(
                        ServerRow.id == self.server_id,
                        ServerRow.task_state.in_(WATCHED),
                        self._mine(),
                    )
                    .values(task_lease=value)
                )
            )
        if won:
            self.value, self.renewed = value, now
        return bool(won)

    def take(self) -> bool:
        """Take over an expired (or never written) lease; True for the one winner."""
        now = self.fleet.clock()
        if self.value is not None and self.value >= now:
            return False
        return self.renew(force=True)


def run(
    fleet: Fleet,
    server_id: str,
    host: str,
    image_id: str,
    token: str,
    lease: Lease,
    poll: float | None = None,
) -> str:
    """The node's part, followed to its end; the job's last state (or "lost", "taken")."""
    outcome = "failed"
    try:
        if not lease.renew(force=True):  # waited so long in the queue that a sweep took it
            outcome = TAKEN
            return outcome
        url = fleet._node_url(host)
        if url is None:
            raise NodeError(f"host {host} is not registered")
        fleet.nodes.snapshot(url, server_id, image_id, token)
        with fleet.db.write() as s:
            s.execute(
                update(ServerRow)
                .where(ServerRow.id == server_id, ServerRow.task_state == SNAPSHOTTING)
                .values(task_state=UPLOADING, updated_at=fleet.clock())
            )
        outcome = follow(fleet, server_id, url, image_id, lease, POLL if poll is None else poll)
    except NodeConflict as exc:
        log.info("snapshot of %s refused by its node: %s", server_id, exc)
    except NodeError as exc:
        log.warning("snapshot of %s failed: %s", server_id, exc)
    finally:
        finish(fleet, server_id, image_id, outcome, token)
    return outcome


def follow(fleet: Fleet, server_id: str, url: str, image_id: str, lease: Lease, poll: float) -> str:
    """Poll the node's job until it ends: its state, "lost" (the node has no such
    job) or "taken" (the lease went to another watcher). NodeError when the node
    stopped answering for NODE_LOST_AFTER seconds."""
    misses = 0
    while True:
        time.sleep(poll)
        if not lease.renew():
            return TAKEN
        try:
            job = fleet.nodes.snapshot_status(url, server_id)
        except NodeError as exc:
            misses += 1
            if misses * poll >= NODE_LOST_AFTER:
                raise NodeError(f"the node stopped answering: {exc}") from exc
            continue
        misses = 0
        if job is None or job.get("image_id") != image_id:
            return "lost"
        if job["state"] != "running":
            outcome = str(job["state"])
            log.info(
                "snapshot of %s into %s %s: %s bytes, %.1f s, guest pause %s ms%s",
                server_id,
                image_id,
                outcome,
                job.get("bytes_sent"),
                float(job.get("seconds") or 0),
                job.get("pause_ms"),
                f" ({job.get('fault')})" if job.get("fault") else "",
            )
            return outcome


def finish(fleet: Fleet, server_id: str, image_id: str | None, outcome: str, token: str) -> None:
    """Delete the image unless the job is ``done``; clear the task (not when taken over)."""
    try:
        if outcome == TAKEN:
            return
        if outcome == "lost" and image_id is not None and _active(fleet, image_id, token):
            outcome = "done"  # the node forgot a job that finished (it restarted since)
        deleted = (
            outcome == "done" or image_id is None or fleet.images.delete_image(image_id, token)
        )
        if not deleted:
            log.warning("snapshot of %s: cannot delete image %s", server_id, image_id)
        same_image = (
            ServerRow.snapshot_image_id.is_(None)
            if image_id is None
            else ServerRow.snapshot_image_id == image_id
        )
        with fleet.db.write() as s:
            s.execute(
                update(ServerRow)
                .where(ServerRow.id == server_id, ServerRow.task_state.in_(WATCHED), same_image)
                .values(
                    task_state=None,
                    snapshot_image_id=None,
                    task_lease=None,
                    updated_at=fleet.clock(),
                )
            )
    finally:
        fleet.watching.discard(server_id)


def _active(fleet: Fleet, image_id: str, token: str) -> bool:
    try:
        doc = fleet.images.doc(image_id, token)
    except ApiFault:  # the image service is down: keep nothing half-made
        return False
    return doc is not None and doc.get("status") == "active"


# -- after a restart: the sweep takes over snapshots nobody follows ----------------------


def recover(fleet: Fleet, token: str | None) -> list[str]:
    """Take over the snapshots whose watcher's lease ran out (their process died) and
    follow each to its end in the background; the servers taken.

    ``token`` deletes a failed snapshot's image (an admin token of the tokens file:
    the caller's token died with its process)."""
    now = fleet.clock()
    with fleet.db.read() as s:
        orphans = list(
            s.execute(
                select(
                    ServerRow.id, ServerRow.host, ServerRow.snapshot_image_id, ServerRow.task_lease
                ).where(
                    ServerRow.task_state.in_(WATCHED),
                    or_(ServerRow.task_lease.is_(None), ServerRow.task_lease < now),
                )
            )
        )
    taken = []
    for server_id, host, image_id, value in orphans:
        if server_id in fleet.watching:
            continue
        lease = Lease(fleet, server_id, value)
        if not lease.take():
            continue  # another replica's sweep won it
        log.warning(
            "snapshot of %s into %s had no watcher (its API process stopped): taking it over",
            server_id,
            image_id,
        )
        fleet.watching.add(server_id)
        taken.append(server_id)
        fleet.submit(resume, fleet, server_id, host, image_id, token or "", lease)
    return taken


def resume(
    fleet: Fleet,
    server_id: str,
    host: str | None,
    image_id: str | None,
    token: str,
    lease: Lease,
    poll: float | None = None,
) -> str:
    """Follow a taken-over snapshot's node job to its end and finish it."""
    outcome = "failed"
    try:
        url = fleet._node_url(host) if host else None
        if url is None:
            raise NodeError(f"host {host} is not registered")
        if image_id is None:  # a row from before the image was recorded: ask the node
            job = fleet.nodes.snapshot_status(url, server_id)
            image_id = str(job["image_id"]) if job and job.get("image_id") else None
            if image_id is None:
                outcome = "lost"
                return outcome
        outcome = follow(fleet, server_id, url, image_id, lease, POLL if poll is None else poll)
    except NodeError as exc:
        log.warning("snapshot of %s, taken over, failed: %s", server_id, exc)
    finally:
        finish(fleet, server_id, image_id, outcome, token)
    log.info("snapshot of %s, taken over, ended %s", server_id, outcome)
    return outcome
