"""Claims: a server's resources taken from a node in one conditional UPDATE.

``UPDATE compute_nodes SET used = used + need WHERE hostname = h AND used + need <=
total * ratio`` changes one row when the node has room and none when it has not; the
database evaluates the condition against the row it locks, so concurrent claims (from
threads or from API replicas, on SQLite or PostgreSQL) can never overcommit a node.
The server row records which node holds its claim (``claim_host``), and a release
clears it with a conditional UPDATE too, so each claim is released exactly once.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from cowfleet.api.db.engine import Database
from cowfleet.api.db.models import NodeRow, ServerRow
from cowfleet.scheduler.model import Need, Ratios


class _NoRoom(Exception):
    """Raised inside the claim's transaction to roll back the server's half."""


def need_of(flavor: dict[str, int]) -> Need:
    """The resources a server of ``flavor`` takes (swap counts towards disk, rounded up)."""
    swap_gb = -(-int(flavor.get("swap", 0)) // 1024)
    return Need(
        vcpus=int(flavor["vcpus"]),
        ram_mb=int(flavor["ram"]),
        disk_gb=int(flavor["disk"]) + int(flavor.get("ephemeral", 0)) + swap_gb,
    )


def _rows(result: object) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


def claim(session: Session, server_id: str, hostname: str, need: Need, ratios: Ratios) -> bool:
    """Take ``need`` on ``hostname`` for ``server_id``; False (nothing changed) if no room.

    Runs in the caller's transaction; on False the caller must roll it back (the
    :class:`~cowfleet.api.db.engine.Database` write session does when this raises).
    """
    took = session.execute(
        update(ServerRow)
        .where(
            ServerRow.id == server_id,
            ServerRow.claim_host.is_(None),
            ServerRow.deleted.is_(False),
        )
        .values(claim_host=hostname)
    )
    if _rows(took) != 1:
        return False
    room = session.execute(
        update(NodeRow)
        .where(
            NodeRow.hostname == hostname,
            NodeRow.enabled.is_(True),
            NodeRow.vcpus_used + need.vcpus <= NodeRow.vcpus * ratios.cpu,
            NodeRow.ram_used_mb + need.ram_mb <= NodeRow.ram_mb * ratios.ram,
            NodeRow.disk_used_gb + need.disk_gb <= NodeRow.disk_gb * ratios.disk,
        )
        .values(
            vcpus_used=NodeRow.vcpus_used + need.vcpus,
            ram_used_mb=NodeRow.ram_used_mb + need.ram_mb,
            disk_used_gb=NodeRow.disk_used_gb + need.disk_gb,
        )
    )
    if _rows(room) != 1:
        raise _NoRoom(hostname)
    return True


def try_claim(db: Database, server_id: str, hostname: str, need: Need, ratios: Ratios) -> bool:
    """:func:`claim` in its own write transaction of ``db``."""
    try:
        with db.write() as session:
            return claim(session, server_id, hostname, need, ratios)
    except _NoRoom:
        return False


def release(session: Session, server_id: str, *, only_on: str | None = None) -> str | None:
    """Give back the server's claim, once; the host it was on, or None if it held none.

    With ``only_on``, only a claim on that host is given back.
    """
    server = session.scalars(select(ServerRow).where(ServerRow.id == server_id)).one_or_none()
    if server is None or server.claim_host is None:
        return None
    if only_on is not None and server.claim_host != only_on:
        return None
    host = server.claim_host
    freed = session.execute(
        update(ServerRow)
        .where(ServerRow.id == server_id, ServerRow.claim_host == host)
        .values(claim_host=None)
        .execution_options(synchronize_session=False)
    )
    if _rows(freed) != 1:
        return None
    need = need_of(server.flavor)
    session.execute(
        update(NodeRow)
        .where(NodeRow.hostname == host)
        .values(
            vcpus_used=NodeRow.vcpus_used - need.vcpus,
            ram_used_mb=NodeRow.ram_used_mb - need.ram_mb,
            disk_used_gb=NodeRow.disk_used_gb - need.disk_gb,
        )
    )
    return host
