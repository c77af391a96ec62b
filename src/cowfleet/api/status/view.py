"""What the status page shows, computed from plain snapshots (no I/O, no clock).

:func:`build_view` takes node and server snapshots as the database holds them and
returns a :class:`StatusView`; the routes take the snapshots, the renderer only
formats. Admins see everything; a member sees its own project's builds (nodes and
the cache matrix, like ``os-hypervisors``, are for admins).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# The cell shown when a node has several entries for one image (a base and a new
# download after a quarantine): the first state of this list that is present.
STATE_ORDER = ("verified", "unverified", "fetching", "failed", "quarantined")
LABELS = {
    "verified": "cached",
    "unverified": "cached, not verified",
    "fetching": "fetching",
    "failed": "failed",
    "quarantined": "quarantined",
}
RECENT_BUILDS = 25


@dataclass(frozen=True)
class NodeSnap:
    """One ``compute_nodes`` row, as read."""

    hostname: str
    enabled: bool
    last_heartbeat: float
    vcpus: int
    vcpus_used: int
    ram_mb: int
    ram_used_mb: int
    disk_gb: int
    disk_used_gb: int
    disk_free_gb: int
    instances: int
    cache: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class ServerSnap:
    """One ``compute_servers`` row, as read."""

    id: str
    name: str
    project_id: str
    image_id: str
    image_name: str | None
    host: str | None
    vm_state: str
    deleted: bool
    created_at: float
    updated_at: float
    launched_at: float | None


@dataclass(frozen=True)
class NodeLine:
    hostname: str
    alive: bool
    enabled: bool
    heartbeat_age: float
    vcpus_used: int
    vcpus: int
    ram_used_mb: int
    ram_mb: int
    disk_used_gb: int
    disk_gb: int
    disk_free_gb: int
    instances: int


@dataclass(frozen=True)
class Cell:
    """One node's copy of one image."""

    state: str  # one of STATE_ORDER
    bytes: int | None
    percent: float | None = None

    @property
    def label(self) -> str:
        text = LABELS.get(self.state, self.state)
        if self.state == "fetching" and self.percent is not None:
            return f"{text} {self.percent:.0f}%"
        return text


@dataclass(frozen=True)
class ImageColumn:
    image_id: str
    name: str | None


@dataclass(frozen=True)
class PrecacheRow:
    """One image making its way onto one node."""

    node: str
    image_id: str
    image_name: str | None
    percent: float | None
    bytes: int | None
    size: int | None
    state: str = "fetching"


@dataclass(frozen=True)
class BuildLine:
    id: str
    name: str
    project_id: str
    image: str
    host: str | None
    state: str
    created_at: float
    seconds: float
    finished: bool


@dataclass(frozen=True)
class StatusView:
    admin: bool
    project: str
    now: float
    nodes: tuple[NodeLine, ...] = ()
    images: tuple[ImageColumn, ...] = ()
    # (hostname, image_id) -> cell; absent: the node does not hold the image
    matrix: dict[tuple[str, str], Cell] = field(default_factory=dict)
    precache: tuple[PrecacheRow, ...] = ()
    builds: tuple[BuildLine, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "admin": self.admin,
            "project": self.project,
            "now": self.now,
            "nodes": [asdict(n) for n in self.nodes],
            "images": [asdict(i) for i in self.images],
            "cache": [
                {"node": host, "image_id": image, "label": c.label, **asdict(c)}
                for (host, image), c in sorted(self.matrix.items())
            ],
            "precache": [asdict(p) for p in self.precache],
            "builds": [asdict(b) for b in self.builds],
        }


def _state(entry: dict[str, Any]) -> str:
    state = entry.get("state")
    if state in STATE_ORDER:
        return str(state)
    # a node from before states were reported: only "verified" was sent
    return "verified" if entry.get("verified") else "unverified"


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cache_matrix(
    nodes: Iterable[NodeSnap],
) -> tuple[tuple[ImageColumn, ...], dict[tuple[str, str], Cell]]:
    """The images any node reports (sorted by name, then id) and each node's cell."""
    names: dict[str, str | None] = {}
    cells: dict[tuple[str, str], Cell] = {}
    for node in nodes:
        for entry in node.cache:
            image_id = entry.get("image_id")
            if not isinstance(image_id, str) or not image_id:
                continue
            name = entry.get("name")
            if isinstance(name, str) and name:
                names[image_id] = name
            else:
                names.setdefault(image_id, None)
            pct = entry.get("percent")
            cell = Cell(
                _state(entry),
                _int_or_none(entry.get("bytes")),
                float(pct) if isinstance(pct, (int, float)) and not isinstance(pct, bool) else None,
            )
            key = (node.hostname, image_id)
            have = cells.get(key)
            if have is None or STATE_ORDER.index(cell.state) < STATE_ORDER.index(have.state):
                cells[key] = cell
    images = tuple(
        ImageColumn(i, n) for i, n in sorted(names.items(), key=lambda kv: (kv[1] or "~", kv[0]))
    )
    return images, cells


def precache_rows(
    nodes: Iterable[NodeSnap], images: Sequence[ImageColumn] = ()
) -> tuple[PrecacheRow, ...]:
    """Pre-cache progress: every image download in flight on a node, with its percent.

    Read from the nodes' heartbeat inventories (a ``.part`` is reported as
    ``fetching``), so it moves as heartbeats arrive. Empty when nothing is fetching.
    """
    named = {i.image_id: i.name for i in images}
    out: list[PrecacheRow] = []
    for node in nodes:
        for entry in node.cache:
            if entry.get("state") != "fetching" or not isinstance(entry.get("image_id"), str):
                continue
            pct = entry.get("percent")
            out.append(
                PrecacheRow(
                    node=node.hostname,
                    image_id=entry["image_id"],
                    image_name=named.get(entry["image_id"]),
                    percent=float(pct) if isinstance(pct, (int, float)) else None,
                    bytes=_int_or_none(entry.get("bytes")),
                    size=_int_or_none(entry.get("size")),
                )
            )
    return tuple(sorted(out, key=lambda r: (r.node, r.image_id)))


def build_line(s: ServerSnap, now: float) -> BuildLine:
    """A server's build: how long it took (or has taken so far)."""
    if s.launched_at is not None:
        seconds, finished = s.launched_at - s.created_at, True
    elif s.vm_state == "building" and not s.deleted:
        seconds, finished = now - s.created_at, False
    else:  # error, or deleted before it was built: the time until the last change
        seconds, finished = s.updated_at - s.created_at, True
    return BuildLine(
        id=s.id,
        name=s.name,
        project_id=s.project_id,
        image=s.image_name or s.image_id,
        host=s.host,
        state="deleted" if s.deleted else s.vm_state,
        created_at=s.created_at,
        seconds=max(0.0, seconds),
        finished=finished,
    )


def build_view(
    nodes: Sequence[NodeSnap],
    servers: Sequence[ServerSnap],
    *,
    now: float,
    down_after: float,
    admin: bool,
    project: str,
    limit: int = RECENT_BUILDS,
    precaching: Sequence[PrecacheRow] = (),
) -> StatusView:
    """The page for one caller: an admin sees the fleet, a member its project's builds."""
    mine = [s for s in servers if admin or s.project_id == project]
    mine.sort(key=lambda s: (-s.created_at, s.id))
    builds = tuple(build_line(s, now) for s in mine[:limit])
    if not admin:
        return StatusView(admin=False, project=project, now=now, builds=builds)
    lines = tuple(
        NodeLine(
            hostname=n.hostname,
            alive=now - n.last_heartbeat <= down_after,
            enabled=n.enabled,
            heartbeat_age=max(0.0, now - n.last_heartbeat),
            vcpus_used=n.vcpus_used,
            vcpus=n.vcpus,
            ram_used_mb=n.ram_used_mb,
            ram_mb=n.ram_mb,
            disk_used_gb=n.disk_used_gb,
            disk_gb=n.disk_gb,
            disk_free_gb=n.disk_free_gb,
            instances=n.instances,
        )
        for n in sorted(nodes, key=lambda n: n.hostname)
    )
    images, matrix = cache_matrix(nodes)
    return StatusView(
        admin=True,
        project=project,
        now=now,
        nodes=lines,
        images=images,
        matrix=matrix,
        precache=_with_precaching(precache_rows(nodes, images), precaching),
        builds=builds,
    )


def _with_precaching(
    fetching: tuple[PrecacheRow, ...], precaching: Sequence[PrecacheRow]
) -> tuple[PrecacheRow, ...]:
    """Heartbeat downloads plus pre-cache nodes (queued, fetching, verifying); the
    pre-cache's report wins for a node and image both name."""
    told = {(r.node, r.image_id) for r in precaching}
    rows = [r for r in fetching if (r.node, r.image_id) not in told] + list(precaching)
    return tuple(sorted(rows, key=lambda r: (r.node, r.image_id)))
