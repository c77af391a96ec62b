"""Opening the compute API's database and bringing its schema up to date.

SQLite (a file in the API's data folder) or PostgreSQL by URL. On SQLite every
writing transaction starts with ``BEGIN IMMEDIATE``: two writers then queue on the
busy timeout instead of one failing at once when it upgrades a read lock. The schema
is the Alembic migrations shipped in this package, applied at start; on PostgreSQL
under an advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cowfleet.errors import BackendUnavailableError, UsageError

log = logging.getLogger(__name__)

# Any constant: the key of the PostgreSQL advisory lock held while migrating.
_MIGRATION_LOCK = 0x636F6D70  # "comp"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and immediate write locks."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 60},
                # Request threads, dispatch threads and the sweep all hold one at times;
                # a SQLite connection costs little.
                pool_size=20,
                max_overflow=100,
            )

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=60000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                immediate = conn.get_execution_options().get("cowfleet_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

            return engine
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise UsageError(f"cannot use database URL {redact(url)}: {exc}") from exc


def redact(url: str) -> str:
    """``url`` without its password."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, creds = head.partition("://")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}"


def migrate(engine: Engine) -> None:
    """Apply every migration not applied yet (idempotent; safe with several replicas)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "cowfleet.api.db:migrations")
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise BackendUnavailableError(f"compute database unavailable: {exc.orig}") from exc


class Database:
    """The engine and two session factories: reads, and writes (immediate on SQLite)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(
            engine.execution_options(cowfleet_write=True), expire_on_commit=False
        )
        # SQLite has one writer at a time. The writers of this process wait on a lock
        # (blocking, woken when it is free) rather than in SQLite's busy handler, which
        # polls with sleeps of up to 100 ms: under 400 concurrent creates it let a writer
        # wait 5-9 s while later ones went first (bench/no_overcommit.py, p99 POST).
        self._write_lock: AbstractContextManager[object] = (
            threading.RLock() if engine.dialect.name == "sqlite" else nullcontext()
        )

    @classmethod
    def open(cls, url: str) -> Database:
        engine = make_engine(url)
        migrate(engine)
        return cls(engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with self._read.begin() as session:
                yield session
        except OperationalError as exc:
            raise BackendUnavailableError(f"compute database error: {exc.orig}") from exc

    @contextmanager
    def write(self) -> Iterator[Session]:
        try:
            with self._write_lock, self._write.begin() as session:
                yield session
        except OperationalError as exc:
            raise BackendUnavailableError(f"compute database error: {exc.orig}") from exc

    def close(self) -> None:
        self.engine.dispose()
