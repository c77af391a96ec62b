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
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from sqlalchemy import select, update

from cowfleet.api import states
from cowfleet.api.context import Ctx
from cowfleet.api.db.models import ServerRow
from cowfleet.api.faults import ApiFault
from cowfleet.api.fleet import Fleet, rows
from cowfleet.api.nodes_client import NodeConflict, NodeError

log = logging.getLogger(__name__)

MAX_NAME = 255
SNAPSHOTTING, UPLOADING = "image_snapshot", "image_uploading"
POLL = 0.5  # seconds between two looks at the node's job
NODE_LOST_AFTER = 120  # consecutive failed looks before the job counts as lost
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
    name = arg.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiFault(400, "Invalid input for field 'name': a non-empty string is required.")
    if len(name) > MAX_NAME:
        raise ApiFault(400, f"Invalid input for field 'name': longer than {MAX_NAME} characters.")
    if re.search(r"[\x00-\x1f\x7f]", name):
        raise ApiFault(400, "Invalid input for field 'name': control characters.")
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
                .values(task_state=SNAPSHOTTING, updated_at=fleet.clock())
            )
        )
    if not won:
        fleet.images.delete_image(image_id, ctx.token)
        raise ApiFault(
            409, f"Cannot 'createImage' instance {server_id}: another task started first."
        )
    fleet.submit(run, fleet, server_id, host, image_id, ctx.token)
    return image_id


def run(
    fleet: Fleet, server_id: str, host: str, image_id: str, token: str, poll: float = POLL
) -> str:
    """The node's part, followed to its end; the job's last state (or "lost")."""
    outcome = "failed"
    try:
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
        misses = 0
        while True:
            time.sleep(poll)
            try:
                job = fleet.nodes.snapshot_status(url, server_id)
            except NodeError as exc:
                misses += 1
                if misses * poll >= NODE_LOST_AFTER:
                    raise NodeError(f"the node stopped answering: {exc}") from exc
                continue
            misses = 0
            if job is None or job.get("image_id") != image_id:
                outcome = "lost"
                break
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
                break
    except NodeConflict as exc:
        log.info("snapshot of %s refused by its node: %s", server_id, exc)
    except NodeError as exc:
        log.warning("snapshot of %s failed: %s", server_id, exc)
    finally:
        if outcome != "done":
            fleet.images.delete_image(image_id, token)
        with fleet.db.write() as s:
            s.execute(
                update(ServerRow)
                .where(
                    ServerRow.id == server_id,
                    ServerRow.task_state.in_((SNAPSHOTTING, UPLOADING)),
                )
                .values(task_state=None, updated_at=fleet.clock())
            )
    return outcome
