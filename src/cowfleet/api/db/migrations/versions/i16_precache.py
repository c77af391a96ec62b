"""Pre-cache progress: one row per pre-cache, one per node in it (issue 16).

Revision ID: i16_precache
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i16_precache"  # alembic refuses "-" in an id: the branch name with "_"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compute_precaches",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("image_id", sa.String(36), nullable=False, index=True),
        sa.Column("target", sa.JSON, nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "compute_precache_nodes",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "precache_id",
            sa.String(36),
            sa.ForeignKey("compute_precaches.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("bytes_done", sa.BigInteger, nullable=False),
        sa.Column("bytes_total", sa.BigInteger),
        sa.Column("rate", sa.Float, nullable=False),
        sa.Column("source", sa.String(255)),
        sa.Column("error", sa.String(1024)),
        sa.Column("sources", sa.JSON, nullable=False),
        sa.Column("dispatched_at", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("precache_id", "host"),
    )


def downgrade() -> None:
    op.drop_table("compute_precache_nodes")
    op.drop_table("compute_precaches")
