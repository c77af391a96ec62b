"""The compute API's first schema: nodes, servers, flavors, aggregates.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compute_nodes",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("hostname", sa.String(255), nullable=False, unique=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("hypervisor_type", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(32)),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("ram_mb", sa.Integer, nullable=False),
        sa.Column("disk_gb", sa.Integer, nullable=False),
        sa.Column("disk_free_gb", sa.Integer, nullable=False),
        sa.Column("vcpus_used", sa.Integer, nullable=False),
        sa.Column("ram_used_mb", sa.Integer, nullable=False),
        sa.Column("disk_used_gb", sa.Integer, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("disabled_reason", sa.String(255)),
        sa.Column("cache", sa.JSON, nullable=False),
        sa.Column("instances", sa.JSON, nullable=False),
        sa.Column("unknown", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_heartbeat", sa.Float, nullable=False),
    )
    op.create_table(
        "compute_servers",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("image_id", sa.String(36), nullable=False),
        sa.Column("image_props", sa.JSON, nullable=False),
        sa.Column("flavor_id", sa.String(255), nullable=False),
        sa.Column("flavor", sa.JSON, nullable=False),
        sa.Column("vm_state", sa.String(32), nullable=False),
        sa.Column("task_state", sa.String(32)),
        sa.Column("power_state", sa.Integer, nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("claim_host", sa.String(255)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("tried_hosts", sa.JSON, nullable=False),
        sa.Column("placement", sa.JSON),
        sa.Column("fault", sa.JSON),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("launched_at", sa.Float),
        sa.Column("deleted_at", sa.Float),
        sa.Column("deadline", sa.Float),
    )
    for column in ("name", "project_id", "vm_state", "host", "deleted"):
        op.create_index(f"ix_compute_servers_{column}", "compute_servers", [column])
    op.create_table(
        "compute_flavors",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(255), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("ram_mb", sa.Integer, nullable=False),
        sa.Column("root_gb", sa.Integer, nullable=False),
        sa.Column("ephemeral_gb", sa.Integer, nullable=False),
        sa.Column("swap_mb", sa.Integer, nullable=False),
        sa.Column("is_public", sa.Boolean, nullable=False),
        sa.Column("description", sa.String(65535)),
        sa.Column("extra_specs", sa.JSON, nullable=False),
    )
    op.create_table(
        "compute_aggregates",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("availability_zone", sa.String(255)),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float),
    )
    op.create_table(
        "compute_aggregate_hosts",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "aggregate_id",
            sa.Integer,
            sa.ForeignKey("compute_aggregates.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("host", sa.String(255), nullable=False),
        sa.UniqueConstraint("aggregate_id", "host"),
    )


def downgrade() -> None:
    for table in (
        "compute_aggregate_hosts",
        "compute_aggregates",
        "compute_flavors",
        "compute_servers",
        "compute_nodes",
    ):
        op.drop_table(table)
