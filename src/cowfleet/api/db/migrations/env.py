"""Alembic environment: always run in-process by :func:`cowfleet.api.db.engine.migrate`."""

from __future__ import annotations

from alembic import context

from cowfleet.api.db.models import Base

VERSION_TABLE = "compute_alembic_version"

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
