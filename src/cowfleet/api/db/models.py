"""The compute API's tables (SQLAlchemy 2.0). Every name starts with ``compute_``.

The prefix lets the API share one PostgreSQL database with the image catalog. The
schema itself is created and upgraded by the Alembic migrations beside this module;
these classes describe it for queries.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class NodeRow(Base):
    """A registered node agent: its capacity, the usage claimed on it, its last report."""

    __tablename__ = "compute_nodes"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    hostname: Mapped[str] = mapped_column(String(255), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    hypervisor_type: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str | None] = mapped_column(String(32))
    vcpus: Mapped[int] = mapped_column(Integer)
    ram_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    disk_free_gb: Mapped[int] = mapped_column(Integer)
    vcpus_used: Mapped[int] = mapped_column(Integer, default=0)
    ram_used_mb: Mapped[int] = mapped_column(Integer, default=0)
    disk_used_gb: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(255))
    cache: Mapped[list[Any]] = mapped_column(JSON, default=list)
    instances: Mapped[list[Any]] = mapped_column(JSON, default=list)
    unknown: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float] = mapped_column(Float)


class ServerRow(Base):
    """A server as users asked for it, and the state the API last learnt from its node."""

    __tablename__ = "compute_servers"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    image_id: Mapped[str] = mapped_column(String(36))
    image_props: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flavor_id: Mapped[str] = mapped_column(String(255))
    flavor: Mapped[dict[str, Any]] = mapped_column(JSON)
    vm_state: Mapped[str] = mapped_column(String(32), index=True)
    task_state: Mapped[str | None] = mapped_column(String(32))
    power_state: Mapped[int] = mapped_column(Integer, default=0)
    host: Mapped[str | None] = mapped_column(String(255), index=True)
    # The node whose usage columns hold this server's resources (None: nothing claimed).
    claim_host: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    tried_hosts: Mapped[list[str]] = mapped_column(JSON, default=list)
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fault: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    launched_at: Mapped[float | None] = mapped_column(Float)
    deleted_at: Mapped[float | None] = mapped_column(Float)
    # When the current step (scheduling, build on a node, an action) is given up.
    deadline: Mapped[float | None] = mapped_column(Float)
    # createImage: the image being filled, and when its watcher's lease runs out
    # (api/snapshots.py; the sweep of any replica takes over an expired lease).
    snapshot_image_id: Mapped[str | None] = mapped_column(String(36))
    task_lease: Mapped[float | None] = mapped_column(Float)


class FlavorRow(Base):
    __tablename__ = "compute_flavors"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    vcpus: Mapped[int] = mapped_column(Integer)
    ram_mb: Mapped[int] = mapped_column(Integer)
    root_gb: Mapped[int] = mapped_column(Integer)
    ephemeral_gb: Mapped[int] = mapped_column(Integer, default=0)
    swap_mb: Mapped[int] = mapped_column(Integer, default=0)
    is_public: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str | None] = mapped_column(String(65535))
    extra_specs: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)


class AggregateRow(Base):
    __tablename__ = "compute_aggregates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    availability_zone: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float | None] = mapped_column(Float)


class AggregateHostRow(Base):
    __tablename__ = "compute_aggregate_hosts"
    __table_args__ = (UniqueConstraint("aggregate_id", "host"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    aggregate_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("compute_aggregates.id", ondelete="CASCADE")
    )
    host: Mapped[str] = mapped_column(String(255))


class PrecacheRow(Base):
    """A pre-cache of one image on a set of nodes (issue 16; docs/compute-api.md)."""

    __tablename__ = "compute_precaches"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    image_id: Mapped[str] = mapped_column(String(36), index=True)
    # What was asked: {"aggregate": id} | {"hosts": [...]} | {"all": true}
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    concurrency: Mapped[int] = mapped_column(Integer, default=0)  # 0: every node at once
    created_at: Mapped[float] = mapped_column(Float)


class PrecacheNodeRow(Base):
    """One node's progress in a pre-cache."""

    __tablename__ = "compute_precache_nodes"
    __table_args__ = (UniqueConstraint("precache_id", "host"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    precache_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("compute_precaches.id", ondelete="CASCADE"), index=True
    )
    host: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    rate: Mapped[float] = mapped_column(Float, default=0.0)
    source: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(String(1024))
    sources: Mapped[list[Any]] = mapped_column(JSON, default=list)  # the peers it was given
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
