"""The image catalog: SQLAlchemy 2.0 models and a small repository.

SQLite by default (WAL journal, busy timeout), PostgreSQL by URL
(``postgresql+psycopg://user:pw@host/db``). Status changes that race (two uploads of
one image, a delete during an upload) are single conditional ``UPDATE``/``DELETE``
statements, so the database decides the winner on every backend.

The schema only grows: :meth:`Catalog.create_schema` creates missing tables and adds
missing nullable columns to an existing ``images`` table. A catalog written by an older
version gains ``image_members`` (the projects a shared image is shared with) and the hash
tree columns (NULL for its images) on its first open by this version. ``image_members``
has no foreign key (an image's members are removed in the transaction that deletes it),
so older code sharing a database can still drop and create its own tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Integer,
    String,
    and_,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cowfleet.errors import BackendUnavailableError, ConflictError, NotFoundError, UsageError
from cowfleet.images.server.access import ListScope

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

QUEUED, SAVING, ACTIVE = "queued", "saving", "active"

# Fields a list may be sorted by, and the value standing in for NULL while sorting.
SORT_KEYS: dict[str, Any] = {
    "name": "",
    "status": "",
    "container_format": "",
    "disk_format": "",
    "size": -1,
    "virtual_size": -1,
    "id": "",
    "created_at": None,
    "updated_at": None,
    "min_disk": None,
    "min_ram": None,
    "visibility": "",
    "owner": "",
}
FILTER_KEYS = ("name", "status", "disk_format", "container_format", "visibility", "owner")


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(30), index=True)
    disk_format: Mapped[str | None] = mapped_column(String(20))
    container_format: Mapped[str | None] = mapped_column(String(20))
    size: Mapped[int | None] = mapped_column(BigInteger)
    virtual_size: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(32))
    os_hash_algo: Mapped[str | None] = mapped_column(String(64))
    os_hash_value: Mapped[str | None] = mapped_column(String(128))
    # The sha256 hash tree's root (hex) and leaf size; NULL for images without a tree.
    tree_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tree_leaf_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    min_disk: Mapped[int] = mapped_column(Integer, default=0)
    min_ram: Mapped[int] = mapped_column(Integer, default=0)
    visibility: Mapped[str] = mapped_column(String(20))
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    properties: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)


class MemberRow(Base):
    """One project an image is shared with, and whether it accepted (Glance v2 members)."""

    __tablename__ = "image_members"

    image_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    member: Mapped[str] = mapped_column(String(255), primary_key=True, index=True)
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


@dataclass(frozen=True)
class MemberRecord:
    image_id: str
    member: str
    status: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ImageRecord:
    """One image as the catalog stores it."""

    id: str
    name: str | None
    status: str
    disk_format: str | None
    container_format: str | None
    size: int | None
    virtual_size: int | None
    checksum: str | None
    os_hash_algo: str | None
    os_hash_value: str | None
    min_disk: int
    min_ram: int
    visibility: str
    protected: bool
    owner: str | None
    created_at: datetime
    updated_at: datetime
    properties: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    tree_sha256: str | None = None
    tree_leaf_size: int | None = None


# Columns a caller may set at create or update (the rest are the server's).
WRITABLE = (
    "name",
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
    "visibility",
    "protected",
    "owner",
)


# What an upload's safety check depends on: fixed once data is being uploaded (Glance).
FIXED_AFTER_QUEUED = ("disk_format", "container_format")


def _record(row: ImageRow) -> ImageRecord:
    return ImageRecord(
        id=row.id,
        name=row.name,
        status=row.status,
        disk_format=row.disk_format,
        container_format=row.container_format,
        size=row.size,
        virtual_size=row.virtual_size,
        checksum=row.checksum,
        os_hash_algo=row.os_hash_algo,
        os_hash_value=row.os_hash_value,
        min_disk=row.min_disk,
        min_ram=row.min_ram,
        visibility=row.visibility,
        protected=row.protected,
        owner=row.owner,
        created_at=row.created_at,
        updated_at=row.updated_at,
        properties=dict(row.properties or {}),
        tags=tuple(row.tags or ()),
        tree_sha256=row.tree_sha256,
        tree_leaf_size=row.tree_leaf_size,
    )


def _member(row: MemberRow) -> MemberRecord:
    return MemberRecord(row.image_id, row.member, row.status, row.created_at, row.updated_at)


def _scope_clause(scope: ListScope) -> Any:
    """The images a caller limited by ``scope`` may list (see :mod:`.access`)."""
    visible = [ImageRow.visibility == "public"]
    if scope.community:
        visible.append(ImageRow.visibility == "community")
    if scope.project is not None:
        visible.append(ImageRow.owner == scope.project)
        members = select(MemberRow.image_id).where(MemberRow.member == scope.project)
        if scope.member_status is not None:
            members = members.where(MemberRow.status == scope.member_status)
        visible.append(and_(ImageRow.visibility == "shared", ImageRow.id.in_(members)))
    return or_(*visible)


def utcnow() -> datetime:
    """Naive UTC with microseconds (the database stores naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and cross-thread use."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, future=True
            )

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            return engine
        return create_engine(url, pool_pre_ping=True, future=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise UsageError(f"cannot use database URL {_redact(url)}: {exc}") from exc


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class Catalog:
    """Repository of :class:`ImageRecord` over one SQLAlchemy engine."""

    def __init__(self, engine: Engine, *, clock: Clock = utcnow) -> None:
        self.engine = engine
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, clock: Clock = utcnow) -> Catalog:
        cat = cls(make_engine(url), clock=clock)
        cat.create_schema()
        return cat

    def create_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
            self._add_missing_columns()
        except OperationalError as exc:
            raise BackendUnavailableError(f"catalog database unavailable: {exc.orig}") from exc

    def _add_missing_columns(self) -> None:
        table = Base.metadata.tables[ImageRow.__tablename__]
        present = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in present]
        if not missing:
            return
        preparer = self.engine.dialect.identifier_preparer
        with self.engine.begin() as conn:
            for col in missing:
                if not col.nullable:
                    raise BackendUnavailableError(
                        f"catalog table {table.name} lacks the column {col.name} (NOT NULL): "
                        "cannot add it in place"
                    )
                kind = col.type.compile(dialect=self.engine.dialect)
                conn.execute(
                    text(
                        f"ALTER TABLE {preparer.quote(table.name)} "
                        f"ADD COLUMN {preparer.quote(col.name)} {kind}"
                    )
                )
                log.warning("catalog: added column %s.%s (%s)", table.name, col.name, kind)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            raise BackendUnavailableError(f"catalog database error: {exc.orig}") from exc

    # -- reads ---------------------------------------------------------------------

    def get(self, image_id: str) -> ImageRecord:
        with self._session() as s:
            row = s.get(ImageRow, image_id)
            if row is None:
                raise NotFoundError(f"no image with id {image_id}", image_id=image_id)
            return _record(row)

    def active_ids(self) -> set[str]:
        """Ids of every active image (those whose data the store must keep)."""
        with self._session() as s:
            return set(s.scalars(select(ImageRow.id).where(ImageRow.status == ACTIVE)))

    def list_page(
        self,
        *,
        filters: Mapping[str, str] | None = None,
        sort_key: str = "created_at",
        sort_dir: str = "desc",
        limit: int = 25,
        marker: str | None = None,
        scope: ListScope | None = None,
    ) -> tuple[list[ImageRecord], bool]:
        """One page of images and whether more follow (keyset pagination on key, id),
        among those ``scope`` lets the caller list (None: every image)."""
        if sort_key not in SORT_KEYS:
            raise UsageError(f"cannot sort by {sort_key!r}")
        if sort_dir not in ("asc", "desc"):
            raise UsageError(f"sort direction must be asc or desc, not {sort_dir!r}")
        col = getattr(ImageRow, sort_key)
        null_as = SORT_KEYS[sort_key]
        key = col if null_as is None else func.coalesce(col, null_as)
        with self._session() as s:
            q = select(ImageRow)
            if scope is not None and not scope.everything:
                q = q.where(_scope_clause(scope))
            for name, value in (filters or {}).items():
                if name not in FILTER_KEYS:
                    raise UsageError(f"cannot filter by {name!r}")
                q = q.where(getattr(ImageRow, name) == value)
            if marker is not None:
                mrow = s.get(ImageRow, marker)
                if mrow is None:
                    raise NotFoundError(f"marker image {marker} not found", image_id=marker)
                mval = getattr(mrow, sort_key)
                if mval is None:
                    mval = null_as
                if sort_dir == "asc":
                    q = q.where(or_(key > mval, and_(key == mval, ImageRow.id > mrow.id)))
                else:
                    q = q.where(or_(key < mval, and_(key == mval, ImageRow.id < mrow.id)))
            order = (
                (key.asc(), ImageRow.id.asc())
                if sort_dir == "asc"
                else (key.desc(), ImageRow.id.desc())
            )
            rows = s.scalars(q.order_by(*order).limit(limit + 1)).all()
            return [_record(r) for r in rows[:limit]], len(rows) > limit

    # -- writes --------------------------------------------------------------------

    def create(
        self,
        image_id: str,
        *,
        fields: Mapping[str, Any],
        properties: Mapping[str, str] | None = None,
        tags: tuple[str, ...] = (),
    ) -> ImageRecord:
        unknown = set(fields) - set(WRITABLE)
        if unknown:
            raise UsageError(f"not writable: {', '.join(sorted(unknown))}")
        now = self._clock()
        row = ImageRow(
            id=image_id,
            name=fields.get("name"),
            status=QUEUED,
            disk_format=fields.get("disk_format"),
            container_format=fields.get("container_format"),
            min_disk=fields.get("min_disk", 0),
            min_ram=fields.get("min_ram", 0),
            visibility=fields.get("visibility", "shared"),
            protected=fields.get("protected", False),
            owner=fields.get("owner"),
            created_at=now,
            updated_at=now,
            properties=dict(properties or {}),
            tags=list(dict.fromkeys(tags)),
        )
        try:
            with self._session() as s:
                s.add(row)
        except SAIntegrityError as exc:
            raise ConflictError(
                f"an image with id {image_id} already exists", image_id=image_id
            ) from exc
        return self.get(image_id)

    def update(
        self,
        image_id: str,
        *,
        fields: Mapping[str, Any],
        properties: Mapping[str, str],
        tags: tuple[str, ...] | None = None,
    ) -> ImageRecord:
        """Replace writable fields and the whole property map of one image.

        :data:`FIXED_AFTER_QUEUED` fields change only while the image is queued
        (ConflictError with ``reason="not queued"`` otherwise).
        """
        unknown = set(fields) - set(WRITABLE)
        if unknown:
            raise UsageError(f"not writable: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = dict(fields)
        values["properties"] = dict(properties)
        if tags is not None:
            values["tags"] = list(dict.fromkeys(tags))
        values["updated_at"] = self._clock()
        where = [ImageRow.id == image_id]
        fixed = sorted(set(fields) & set(FIXED_AFTER_QUEUED))
        if fixed:
            # In the same statement as the write, so an upload claimed meanwhile wins.
            where.append(ImageRow.status == QUEUED)
        with self._session() as s:
            res = s.execute(update(ImageRow).where(*where).values(**values))
            if res.rowcount == 0:  # type: ignore[attr-defined]
                row = s.get(ImageRow, image_id)
                if row is None:
                    raise NotFoundError(f"no image with id {image_id}", image_id=image_id)
                raise ConflictError(
                    f"image {image_id} is {row.status}: {' and '.join(fixed)} can only be "
                    "changed while the image is queued",
                    image_id=image_id,
                    status=row.status,
                    reason="not queued",
                )
        return self.get(image_id)

    def claim_upload(self, image_id: str) -> ImageRecord:
        """queued -> saving, atomically. ConflictError when the image is not queued."""
        with self._session() as s:
            res = s.execute(
                update(ImageRow)
                .where(ImageRow.id == image_id, ImageRow.status == QUEUED)
                .values(status=SAVING, updated_at=self._clock())
            )
            won = res.rowcount == 1  # type: ignore[attr-defined]
        rec = self.get(image_id)
        if not won:
            raise ConflictError(
                f"image {image_id} is {rec.status}: data can only be uploaded to a queued image",
                image_id=image_id,
                status=rec.status,
            )
        return rec

    def finish_upload(
        self,
        image_id: str,
        *,
        size: int,
        virtual_size: int,
        checksum: str,
        os_hash_algo: str,
        os_hash_value: str,
        tree_sha256: str | None = None,
        tree_leaf_size: int | None = None,
    ) -> ImageRecord:
        """saving -> active with the computed fields. NotFoundError if deleted meanwhile."""
        with self._session() as s:
            res = s.execute(
                update(ImageRow)
                .where(ImageRow.id == image_id, ImageRow.status == SAVING)
                .values(
                    status=ACTIVE,
                    size=size,
                    virtual_size=virtual_size,
                    checksum=checksum,
                    os_hash_algo=os_hash_algo,
                    os_hash_value=os_hash_value,
                    tree_sha256=tree_sha256,
                    tree_leaf_size=tree_leaf_size,
                    updated_at=self._clock(),
                )
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFoundError(
                    f"image {image_id} was deleted during the upload", image_id=image_id
                )
        return self.get(image_id)

    def release_upload(self, image_id: str) -> None:
        """saving -> queued after a failed or aborted upload (no-op if deleted)."""
        with self._session() as s:
            s.execute(
                update(ImageRow)
                .where(ImageRow.id == image_id, ImageRow.status == SAVING)
                .values(status=QUEUED, updated_at=self._clock())
            )

    def delete(self, image_id: str) -> ImageRecord:
        """Delete an unprotected image (ConflictError with ``reason="protected"`` if not)."""
        with self._session() as s:
            row = s.get(ImageRow, image_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no image with id {image_id}", image_id=image_id)
            rec = _record(row)
            res = s.execute(
                delete(ImageRow).where(ImageRow.id == image_id, ImageRow.protected.is_(False))
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError(
                    f"image {image_id} is protected and cannot be deleted",
                    image_id=image_id,
                    reason="protected",
                )
            s.execute(delete(MemberRow).where(MemberRow.image_id == image_id))
            return rec

    def reset_saving(self) -> int:
        """At start: uploads in flight when the server stopped go back to queued."""
        with self._session() as s:
            res = s.execute(
                update(ImageRow)
                .where(ImageRow.status == SAVING)
                .values(status=QUEUED, updated_at=self._clock())
            )
            n = int(res.rowcount)  # type: ignore[attr-defined]
        if n:
            log.warning("reset %d image(s) stuck in saving to queued", n)
        return n

    # -- members of shared images ----------------------------------------------------

    def membership(self, image_id: str, project: str | None) -> str | None:
        """``project``'s member status on the image, or None when it is no member."""
        if project is None:
            return None
        with self._session() as s:
            row = s.get(MemberRow, (image_id, project))
            return None if row is None else row.status

    def list_members(self, image_id: str) -> list[MemberRecord]:
        with self._session() as s:
            q = select(MemberRow).where(MemberRow.image_id == image_id)
            return [
                _member(r) for r in s.scalars(q.order_by(MemberRow.created_at, MemberRow.member))
            ]

    def get_member(self, image_id: str, member: str) -> MemberRecord:
        with self._session() as s:
            row = s.get(MemberRow, (image_id, member))
            if row is None:
                raise NotFoundError(
                    f"project {member} is not a member of image {image_id}", image_id=image_id
                )
            return _member(row)

    def add_member(self, image_id: str, member: str) -> MemberRecord:
        """Share the image with ``member`` (status ``pending``); 409 if it already is."""
        now = self._clock()
        try:
            with self._session() as s:
                # Locks the image row: a delete running meanwhile waits, then removes us.
                if s.get(ImageRow, image_id, with_for_update=True) is None:
                    raise NotFoundError(f"no image with id {image_id}", image_id=image_id)
                if s.get(MemberRow, (image_id, member)) is not None:
                    raise ConflictError(
                        f"project {member} is already a member of image {image_id}",
                        image_id=image_id,
                    )
                s.add(
                    MemberRow(
                        image_id=image_id,
                        member=member,
                        status="pending",
                        created_at=now,
                        updated_at=now,
                    )
                )
        except SAIntegrityError as exc:
            raise ConflictError(
                f"project {member} is already a member of image {image_id}", image_id=image_id
            ) from exc
        return self.get_member(image_id, member)

    def set_member_status(self, image_id: str, member: str, status: str) -> MemberRecord:
        with self._session() as s:
            res = s.execute(
                update(MemberRow)
                .where(MemberRow.image_id == image_id, MemberRow.member == member)
                .values(status=status, updated_at=self._clock())
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFoundError(
                    f"project {member} is not a member of image {image_id}", image_id=image_id
                )
        return self.get_member(image_id, member)

    def remove_member(self, image_id: str, member: str) -> None:
        with self._session() as s:
            res = s.execute(
                delete(MemberRow).where(MemberRow.image_id == image_id, MemberRow.member == member)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFoundError(
                    f"project {member} is not a member of image {image_id}", image_id=image_id
                )
