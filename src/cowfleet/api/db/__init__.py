"""The compute API's database: models, engine, and the Alembic migrations run at start."""
