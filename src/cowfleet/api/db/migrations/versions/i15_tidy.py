"""Snapshot watchers that survive an API restart: the image and a lease (issue 17).

``snapshot_image_id`` is the image a running ``createImage`` fills; ``task_lease`` is
when the lease of the process following the node's job runs out. The sweep of any
replica takes over a snapshot whose lease ran out (a conditional UPDATE: one winner).

Revision ID: i15_tidy
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i15_tidy"  # alembic refuses "-" in an id: the branch name with "_"
# After i16_precache, already on main (down_revision "0001" would make two heads).
down_revision = "i16_precache"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compute_servers") as batch:
        batch.add_column(sa.Column("snapshot_image_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("task_lease", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compute_servers") as batch:
        batch.drop_column("task_lease")
        batch.drop_column("snapshot_image_id")
