"""The results store: scans, images and faces in SQLite or PostgreSQL (SQLAlchemy 2 Core).

Every write is batched and idempotent. Images are unique on their natural key (bucket, key, etag,
backend), so listing the same object twice queues it once; a batch's results are written in one
transaction that replaces the batch's faces, so a redelivered batch never doubles a row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import (
    DateTime,
    DefaultClause,
    Engine,
    Integer,
    String,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from worker.errors import ConfigurationError
from worker.results import BoundingBox, RecognitionResult
from worker.retry import retry_database
from worker.schema import DONE, FAILED, QUEUED, STATUSES, faces, images, metadata, scans
from worker.settings import Settings

CHUNK_SIZE = 1000
#: A worker host that vanishes mid-transaction (power loss, network cut) leaves its session holding
#: row locks that would stall the workers retrying its batch. PostgreSQL ends such a session after
#: about a minute: when it sits idle in the transaction, by a timeout; when it waits in the middle
#: of a COPY ("active": no timeout applies), by TCP: keepalives the server sends and nobody answers
#: (30 s idle, then 3 probes 10 s apart), or, when its last message was never acknowledged (then
#: no keepalive is sent, and retransmissions go on for ~15 minutes), the TCP user timeout.
#: celebscan's own transactions last milliseconds.
SESSION_OPTIONS = " ".join(
    f"-c {name}={value}"
    for name, value in {
        "idle_in_transaction_session_timeout": 60_000,
        "tcp_keepalives_idle": 30,
        "tcp_keepalives_interval": 10,
        "tcp_keepalives_count": 3,
        "tcp_user_timeout": 60_000,
    }.items()
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def masked_url(url: str) -> str:
    """The database URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


#: The spellings users have (psql, RDS and most guides write ``postgresql://``, Heroku-style
#: ``DATABASE_URL`` values ``postgres://``) name no driver; SQLAlchemy 2.1 would pick psycopg 3,
#: which celebscan does not install, and knows no ``postgres`` dialect at all.
_DRIVERLESS_POSTGRESQL = ("postgresql", "postgres")


def with_driver(url: str) -> str:
    """``url`` with the installed PostgreSQL driver (psycopg2) named; an explicit ``+driver`` is kept."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.drivername not in _DRIVERLESS_POSTGRESQL:
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def connect(url: str) -> Engine:
    """An engine for ``url`` with the schema created; a clean ``ConfigurationError`` if unreachable."""
    url = with_driver(url)
    try:
        engine = create_engine(url, **_engine_options(url))
    except (ArgumentError, ImportError) as exc:
        raise ConfigurationError(f"cannot use database {masked_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        create_or_upgrade_schema(engine)
    except OperationalError as exc:
        reason = " ".join(str(exc.orig).split())
        raise ConfigurationError(f"cannot reach database {masked_url(url)}: {reason}") from exc
    return engine


#: The PostgreSQL advisory lock (an arbitrary constant: "celebscan") held while the schema is made.
SCHEMA_LOCK = 0x63656C6562


#: Values for columns added to existing rows: scans made before listings were streamed were listed
#: in full before they started.
_BACKFILL = {("scans", "listing_finished_at"): "UPDATE scans SET listing_finished_at = created_at"}


def create_or_upgrade_schema(engine: Engine) -> None:
    """Create the tables, or bring a database made by an older celebscan up to date.

    Every process that opens the database runs this (a fleet scaling out from zero starts many at
    once), so on PostgreSQL it runs in one transaction holding an advisory lock: the first process
    creates or upgrades, the others wait, then find nothing left to do. DDL is transactional there,
    so an upgrade is all or nothing.
    """
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
        metadata.create_all(conn)
        _add_missing_columns_and_indexes(conn)


def _add_missing_columns_and_indexes(conn) -> None:
    """Add the columns and indexes a database made by an older celebscan lacks.

    Every column added since the first release is nullable or has a server default, so adding it
    is all the migration needed; ``create_all`` already makes new tables.
    """
    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        existing = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in existing:
                continue
            column_type = column.type.compile(conn.dialect)
            server_default = column.server_default
            default = f" DEFAULT {_sql_text(server_default.arg)}" if isinstance(server_default, DefaultClause) else ""
            required = "" if column.nullable else " NOT NULL"
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column_type}{required}{default}"))
            if (table.name, column.name) in _BACKFILL:
                conn.execute(text(_BACKFILL[table.name, column.name]))
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)


def _sql_text(clause) -> str:
    return clause if isinstance(clause, str) else str(clause.compile(compile_kwargs={"literal_binds": True}))


def _engine_options(url: str) -> dict[str, Any]:
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 60}}
    # psycopg2's plain executemany is one round trip per row; batch the UPDATEs (execute_batch)
    # and the INSERTs (multi-row VALUES) instead.
    return {
        "pool_pre_ping": True,
        "executemany_mode": "values_plus_batch",
        "executemany_batch_page_size": 500,
        "connect_args": {"options": SESSION_OPTIONS},
    }


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """WAL lets readers run beside the one writer; the busy timeout makes pool processes queue."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def chunks(iterable: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` items; when the iterable fails part-way, the items before the failure are
    handed out as a last chunk before the error is raised (a listing's pages already read are kept)."""
    iterator = iter(iterable)
    while True:
        chunk: list = []
        error: Exception | None = None
        try:
            chunk.extend(itertools.islice(iterator, size))
        except Exception as exc:
            error = exc
        if chunk:
            yield chunk
        if error is not None:
            raise error
        if len(chunk) < size:
            return


def dialect_insert(engine: Engine, table):
    """An INSERT that supports ``on_conflict_do_nothing`` on the engine's dialect."""
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(table)


class Listed(Protocol):
    """What a source listing yields for each object."""

    @property
    def key(self) -> str: ...

    @property
    def etag(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def error(self) -> tuple[str, str] | None:
        """(code, message) of an entry that can never be read: recorded failed at once."""
        ...


@dataclass(frozen=True)
class QueueReport:
    image_ids: list[int]
    listed: int
    skipped: int


@dataclass(frozen=True)
class QueuedImage:
    id: int
    scan_id: int
    source: str
    bucket: str
    key: str
    etag: str
    size: int
    attempts: int
    backend: str = ""
    prefilter_faces: bool = False
    paid_calls: int = 0  # billed calls so far (a lost batch redone is billed again)
    calls_saved: int = 0
    started_by: str | None = None  # the delivery (message) that last started it
    retries: int = 0  # tries that ended in a transient error, over every delivery
    retry_since: datetime | None = None  # the first of those; the retry deadline counts from it


@dataclass(frozen=True)
class ImageOutcome:
    """What processing one image produced: a result, or the reason it failed."""

    image_id: int
    status: str
    width: int | None = None
    height: int | None = None
    result: RecognitionResult | None = None
    error_code: str | None = None
    error_message: str | None = None
    # The image's totals after this outcome (None: unchanged): set, never added, so writing the
    # same outcome twice (a retried write) counts nothing twice.
    paid_calls: int | None = None  # calls a paid recognizer billed for this image
    calls_saved: int | None = None  # calls the face prefilter kept from the paid recognizer
    content_hash: str | None = None  # MD5 of the bytes read (None: not read, or unchanged)
    # A deferred image (status still ``queued``: a transient cause outlasted the in-process
    # retries) gets its delivery count put back, as this delivery did not crash, and its retries.
    attempts: int | None = None
    retries: int | None = None
    retry_since: datetime | None = None
    retry_rounds: int = 0
    not_before: datetime | None = None  # a deferred image is not claimed again before this

    @property
    def deferred(self) -> bool:
        return self.status == QUEUED

    @classmethod
    def done(
        cls,
        image_id: int,
        width: int,
        height: int,
        result: RecognitionResult,
        *,
        paid_calls: int | None = None,
        calls_saved: int | None = None,
    ) -> ImageOutcome:
        return cls(image_id, DONE, width, height, result, paid_calls=paid_calls, calls_saved=calls_saved)

    @classmethod
    def deferred_for(
        cls,
        image: QueuedImage,
        code: str,
        message: str,
        *,
        retries: int,
        retry_since: datetime,
        rounds: int,
        not_before: datetime | None = None,
    ) -> ImageOutcome:
        return cls(
            image.id,
            QUEUED,
            error_code=code,
            error_message=message[:2000],
            attempts=image.attempts,
            retries=retries,
            retry_since=retry_since,
            retry_rounds=rounds,
            not_before=not_before,
        )

    @classmethod
    def failed(
        cls, image_id: int, code: str, message: str, width: int | None = None, height: int | None = None
    ) -> ImageOutcome:
        return cls(image_id, FAILED, width, height, error_code=code, error_message=message[:2000])


class MissingImagesError(LookupError):
    """Results were handed in for images the store does not have; nothing of the batch was written."""


def _check_all_found(found: int, ids: Sequence[int]) -> None:
    if found != len(ids):
        raise MissingImagesError(
            f"{len(ids) - found} of the batch's {len(ids)} images are not in the images table "
            "(deleted while the batch ran?); nothing of the batch was written"
        )


@dataclass(frozen=True)
class ScanSummary:
    id: int
    source: str
    backend: str
    created_at: datetime
    finished_at: datetime | None
    listed: int
    skipped: int
    counts: dict[str, int]
    faces: int
    people: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_processed_at: datetime | None = None
    paid_calls: int = 0
    calls_saved: int = 0
    #: Queued images whose last try ended in a transient error, by its code: they are tried again.
    retrying: dict[str, int] = field(default_factory=dict)
    #: Why workers hand this scan's batches back (none could run its recognizer), while none is served.
    unserved: str | None = None
    #: "listing" while the source is being listed, "listed" after, "listing failed" (see listing_error).
    listing: str = "listed"
    listing_error: str | None = None

    @property
    def processed(self) -> int:
        return self.counts[DONE] + self.counts[FAILED]

    @property
    def rate(self) -> float | None:
        """Images per second since the scan was created, or None before the first result."""
        if not self.processed or self.last_processed_at is None:
            return None
        seconds = (aware_utc(self.last_processed_at) - aware_utc(self.created_at)).total_seconds()
        return self.processed / seconds if seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        return self.counts[QUEUED] / rate if rate else None


@dataclass(frozen=True)
class ScanProgress:
    """Images of one scan by status: what monitoring exports and scaling reads."""

    scan_id: int
    finished: bool
    counts: dict[str, int]
    last_processed_at: datetime | None
    unserved: str | None = None  # why workers hand its batches back, while none is served


def aware_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything celebscan writes is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class ResultStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def connect(cls, url: str) -> ResultStore:
        return cls(connect(url))

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultStore:
        """The store of ``settings``, with credentials from Secrets Manager when a secret is set."""
        from worker.database_secret import database_url

        return cls.connect(database_url(settings))

    # -- producer side -------------------------------------------------------------------------

    def create_scan(
        self,
        source: str,
        backend: str,
        *,
        prefilter_faces: bool = False,
        budget_images: int | None = None,
        batch_size: int | None = None,
    ) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                scans.insert()
                .values(
                    source=source,
                    backend=backend,
                    created_at=utcnow(),
                    listed=0,
                    skipped=0,
                    prefilter_faces=prefilter_faces,
                    budget_images=budget_images,
                    batch_size=batch_size,
                )
                .returning(scans.c.id)
            ).scalar_one()

    def done_objects(self, bucket: str, backend: str, keys: Sequence[str]) -> set[tuple[str, str]]:
        """(key, etag) of the given keys already ``done`` with this backend: what a scan would skip."""
        with self.engine.connect() as conn:
            return {known for known, row in _known_objects(conn, bucket, backend, keys).items() if row.status == DONE}

    def queue_images(
        self,
        scan_id: int,
        bucket: str,
        backend: str,
        listed: Iterable[Listed],
        *,
        force: bool = False,
        keep_ids: bool = True,
    ) -> QueueReport:
        """Record every listed object as ``queued`` in this scan, except those already done.

        An object already done with the same etag is skipped (never paid for twice) unless
        ``force``; one that failed or was left queued by an interrupted scan is queued again. Each
        chunk is committed as it is listed, so workers claim images while the listing goes on; at
        the end the listing is marked finished (and the scan too, if nothing is left queued).
        ``keep_ids`` returns the queued ids (tests and small jobs; a scan keeps none in memory).
        """
        image_ids: list[int] = []
        total = skipped = 0
        for chunk in chunks(listed, CHUNK_SIZE):
            with self.engine.begin() as conn:
                ids, chunk_skipped = self._queue_chunk(conn, scan_id, bucket, backend, chunk, force, keep_ids)
                total, skipped = total + len(chunk), skipped + chunk_skipped
                # the counts so far, with the chunk: status shows the listing's progress
                conn.execute(update(scans).where(scans.c.id == scan_id).values(listed=total, skipped=skipped))
            image_ids += ids
        with self.engine.begin() as conn:
            conn.execute(update(scans).where(scans.c.id == scan_id).values(listing_finished_at=utcnow()))
        self.finish_scans([scan_id])
        return QueueReport(image_ids=image_ids, listed=total, skipped=skipped)

    def renew_budget(self, scan_id: int, images_more: int | None) -> None:
        """``--resume``: allow ``images_more`` further images to be handed out (None: all of them)."""
        budget = None if images_more is None else scans.c.handed_out + images_more
        with self.engine.begin() as conn:
            conn.execute(update(scans).where(scans.c.id == scan_id).values(budget_images=budget))

    def record_listing_error(self, scan_id: int, reason: str) -> None:
        """The listing stopped part-way: what was listed stays queued (``scan --resume``)."""
        with self.engine.begin() as conn:
            conn.execute(update(scans).where(scans.c.id == scan_id).values(listing_error=reason[:2000]))

    def _queue_chunk(self, conn, scan_id, bucket, backend, chunk, force, keep_ids) -> tuple[list[int], int]:
        now = utcnow()
        listed_keys = [item.key for item in chunk]
        if conn.dialect.name == "postgresql" and not any(item.error for item in chunk):
            # One statement inserts what is new (a fresh bucket: everything) and says what it took;
            # only the rest is looked up, to skip what is done or queue again what failed.
            inserted = {
                (key, etag)
                for key, etag in conn.execute(
                    _POSTGRESQL_INSERT_NEW,
                    {
                        "scan_id": scan_id,
                        "bucket": bucket,
                        "backend": backend,
                        "now": now,
                        "keys": [item.key for item in chunk],
                        "etags": [item.etag for item in chunk],
                        "sizes": [item.size for item in chunk],
                    },
                )
            }
            chunk = [item for item in chunk if (item.key, item.etag) not in inserted]
        keys = [item.key for item in chunk]
        known = _known_objects(conn, bucket, backend, keys) if chunk else {}
        new_rows, requeue, unreadable, skipped = [], [], [], 0
        for item in chunk:
            row = known.get((item.key, item.etag))
            error = item.error
            if row is None:
                new_rows.append(
                    dict(
                        scan_id=scan_id,
                        bucket=bucket,
                        key=item.key,
                        etag=item.etag,
                        size=item.size,
                        backend=backend,
                        queued_at=now,
                        processed_at=None,
                        **_QUEUED_AFRESH,
                    )
                )
                if error:
                    new_rows[-1].update(status=FAILED, error_code=error[0], error_message=error[1], processed_at=now)
            elif error:
                unreadable.append(dict(b_id=row.id, b_code=error[0], b_message=error[1]))
            elif row.status == DONE and not force:
                skipped += 1
            else:
                requeue.append(row.id)
        if new_rows:
            conn.execute(dialect_insert(self.engine, images).on_conflict_do_nothing(), new_rows)
        if requeue:
            conn.execute(
                update(images).where(images.c.id.in_(requeue)).values(scan_id=scan_id, queued_at=now, **_QUEUED_AFRESH)
            )
        if unreadable:  # listed unreadable again: failed again, now in this scan
            conn.execute(
                update(images)
                .where(images.c.id == bindparam("b_id"))
                .values(
                    scan_id=scan_id,
                    status=FAILED,
                    error_code=bindparam("b_code"),
                    error_message=bindparam("b_message"),
                    queued_at=now,
                    processed_at=now,
                ),
                unreadable,
            )
        if not keep_ids:
            return [], skipped
        queued = conn.execute(
            select(images.c.id)
            .where(
                images.c.bucket == bucket,
                images.c.backend == backend,
                images.c.scan_id == scan_id,
                images.c.status == QUEUED,
                images.c.key.in_(listed_keys),
            )
            .order_by(images.c.id)
        )
        return list(queued.scalars()), skipped

    def queued_image_ids(self, scan_id: int) -> list[int]:
        with self.engine.connect() as conn:
            query = select(images.c.id).where(images.c.scan_id == scan_id, images.c.status == QUEUED)
            return list(conn.execute(query.order_by(images.c.id)).scalars())

    # -- worker side ---------------------------------------------------------------------------

    @retry_database
    def pending(self, image_ids: Sequence[int]) -> list[QueuedImage]:
        """The images of a batch that are still ``queued`` (a redelivered batch may be half done)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    images.c.id,
                    images.c.scan_id,
                    scans.c.source,
                    images.c.bucket,
                    images.c.key,
                    images.c.etag,
                    images.c.size,
                    images.c.attempts,
                    images.c.backend,
                    scans.c.prefilter_faces,
                    images.c.paid_calls,
                    images.c.calls_saved,
                    images.c.started_by,
                    images.c.retries,
                    images.c.retry_since,
                )
                .join(scans, images.c.scan_id == scans.c.id)
                .where(images.c.id.in_(list(image_ids)), images.c.status == QUEUED)
                .order_by(images.c.id)
            )
            return [QueuedImage(**row._mapping) for row in rows]

    @retry_database
    def start(self, batch: Sequence[QueuedImage], max_deliveries: int, delivery: str = "") -> list[QueuedImage]:
        """Count a delivery on each image before work starts, and quarantine repeat offenders.

        ``delivery`` names the message being run (Celery: task id and retry number). A message
        delivered again with the same name means its earlier run never ended: it may have crashed
        the worker, and counts. A new message (a retry after a handled error, a deferred image sent
        again, ``--resume``) follows runs that ended, so the count starts over at one. The count is
        committed first, so a worker killed by an image still leaves a mark; an image started
        ``max_deliveries`` times by one message is failed instead of tried again.
        """
        poison = [image for image in batch if image.started_by == delivery and image.attempts >= max_deliveries]
        live = [image for image in batch if image not in poison]
        with self.engine.begin() as conn:
            if poison:
                message = f"processing was interrupted {max_deliveries} times (the image may crash workers)"
                conn.execute(
                    update(images)
                    .where(images.c.id.in_([image.id for image in poison]), images.c.status == QUEUED)
                    .values(status=FAILED, error_code="Quarantined", error_message=message, processed_at=utcnow())
                )
            if live:  # absolute values: a retried start counts once
                conn.execute(
                    update(images)
                    .where(images.c.id == bindparam("b_id"))
                    .values(attempts=bindparam("b_attempts"), started_by=delivery),
                    [
                        {"b_id": image.id, "b_attempts": image.attempts + 1 if image.started_by == delivery else 1}
                        for image in live
                    ],
                )
        if poison:
            self.finish_scans({image.scan_id for image in poison})
        return live

    def save_outcomes(self, outcomes: Sequence[ImageOutcome]) -> None:
        """Write a batch's results in one transaction: image rows updated, faces replaced.

        Then, in its own statement after that commit, finish the batch's scans that have nothing
        left queued: of two workers writing a scan's last batches at once, the later one sees both.
        Each step is retried on its own while the database is unreachable, and every value is set,
        never added, so a step written twice counts nothing twice.
        """
        outcomes = list({outcome.image_id: outcome for outcome in outcomes}.values())  # an image once
        if outcomes:
            self.finish_scans(self._write_outcomes(outcomes))

    @retry_database
    def _write_outcomes(self, outcomes: Sequence[ImageOutcome]) -> set[int]:
        """The write transaction; returns the batch's scan ids."""
        ids = [outcome.image_id for outcome in outcomes]
        now = utcnow()
        if self.engine.dialect.name != "postgresql":
            face_rows = [row for o in outcomes if o.result for row in _face_rows(o.image_id, o.result)]
            with self.engine.begin() as conn:
                return _save_outcomes_portable(conn, outcomes, ids, face_rows, now)
        face_values = (values for o in outcomes if o.result for values in _face_values(o.image_id, o.result))
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            return _save_outcomes_postgresql(conn, outcomes, ids, face_values, now)

    @retry_database
    def note_unserved_scan(self, scan_id: int, reason: str) -> None:
        """Tell the scan that a worker could not serve its next batch (the slot goes back to the broker)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(scans).where(scans.c.id == scan_id).values(unserved_at=utcnow(), unserved_reason=reason[:2000])
            )

    @retry_database
    def note_unserved(self, image_ids: Sequence[int], reason: str) -> None:
        """Tell the batch's scans that a worker could not serve it (the batch goes back to the broker)."""
        scan_ids = select(images.c.scan_id).where(images.c.id.in_(list(image_ids))).distinct()
        with self.engine.begin() as conn:
            conn.execute(
                update(scans)
                .where(scans.c.id.in_(scan_ids))
                .values(unserved_at=utcnow(), unserved_reason=reason[:2000])
            )

    @retry_database
    def finish_scans(self, scan_ids: Iterable[int]) -> None:
        """Mark scans finished when nothing of them is queued (also right away for an empty scan)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            _finish_scans_if_drained(conn, scan_ids)

    # -- reading -------------------------------------------------------------------------------

    def latest_scan_id(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(scans.c.id))).scalar()

    def progress(self) -> list[ScanProgress]:
        """Images by status of every unfinished scan, and of the latest scan even when finished."""
        with self.engine.connect() as conn:
            latest = select(func.max(scans.c.id)).scalar_subquery()
            rows = conn.execute(
                select(
                    scans.c.id,
                    scans.c.finished_at,
                    images.c.status,
                    func.count(images.c.id),
                    func.max(images.c.processed_at),
                )
                .select_from(scans.outerjoin(images, images.c.scan_id == scans.c.id))
                .where(scans.c.finished_at.is_(None) | (scans.c.id == latest))
                .group_by(scans.c.id, scans.c.finished_at, images.c.status)
                .order_by(scans.c.id)
            ).all()
            notes = conn.execute(
                select(scans).where(scans.c.finished_at.is_(None), scans.c.unserved_at.is_not(None))
            ).all()
        finished: dict[int, bool] = {}
        counts: dict[int, dict[str, int]] = {}
        last: dict[int, datetime] = {}
        for scan_id, finished_at, status, count, processed_at in rows:
            finished[scan_id] = finished_at is not None
            counts.setdefault(scan_id, dict.fromkeys(STATUSES, 0))
            if status is not None:
                counts[scan_id][status] = count
            if processed_at is not None:
                last[scan_id] = max(last.get(scan_id, aware_utc(processed_at)), aware_utc(processed_at))
        unserved = {
            scan.id: _unserved(scan, last.get(scan.id), counts.get(scan.id, {}).get(QUEUED, 0)) for scan in notes
        }
        return [
            ScanProgress(scan_id, finished[scan_id], counts[scan_id], last.get(scan_id), unserved.get(scan_id))
            for scan_id in finished
        ]

    def summary(self, scan_id: int) -> ScanSummary:
        """The summary of a scan that must exist."""
        summary = self.scan_summary(scan_id)
        if summary is None:
            raise ConfigurationError(f"there is no scan {scan_id}")
        return summary

    def scan_summary(self, scan_id: int) -> ScanSummary | None:
        with self.engine.connect() as conn:
            scan = conn.execute(select(scans).where(scans.c.id == scan_id)).one_or_none()
            if scan is None:
                return None
            in_scan = images.c.scan_id == scan_id
            counts = dict.fromkeys(STATUSES, 0)
            counts.update(
                conn.execute(select(images.c.status, func.count()).where(in_scan).group_by(images.c.status)).all()
            )
            last, paid_calls, calls_saved = conn.execute(
                select(
                    func.max(images.c.processed_at),
                    func.coalesce(func.sum(images.c.paid_calls), 0),
                    func.coalesce(func.sum(images.c.calls_saved), 0),
                ).where(in_scan)
            ).one()
            failures: dict[str, int] = {}
            retrying: dict[str, int] = {}
            for status, code, count in conn.execute(
                select(images.c.status, images.c.error_code, func.count())
                .where(in_scan, images.c.status.in_([FAILED, QUEUED]), images.c.error_code.is_not(None))
                .group_by(images.c.status, images.c.error_code)
            ):
                (failures if status == FAILED else retrying)[code] = count
            face_join = faces.join(images, faces.c.image_id == images.c.id)
            face_count = conn.execute(select(func.count()).select_from(face_join).where(in_scan)).scalar_one()
            people: dict[str, int] = dict(
                conn.execute(  # type: ignore[arg-type]  # rows of (name, count)
                    select(faces.c.name, func.count(func.distinct(faces.c.image_id)))
                    .select_from(face_join)
                    .where(in_scan, faces.c.name.is_not(None))
                    .group_by(faces.c.name)
                    .order_by(faces.c.name)
                ).all()
            )
        return ScanSummary(
            id=scan.id,
            source=scan.source,
            backend=scan.backend,
            created_at=scan.created_at,
            finished_at=scan.finished_at,
            listed=scan.listed,
            skipped=scan.skipped,
            counts=counts,
            faces=face_count,
            people=people,
            failures=failures,
            last_processed_at=last,
            paid_calls=int(paid_calls),
            calls_saved=int(calls_saved),
            retrying=retrying,
            unserved=_unserved(scan, last, counts[QUEUED]),
            listing=_listing_state(scan),
            listing_error=scan.listing_error,
        )

    def result_records(self, scan_id: int | None = None, key: str | None = None) -> Iterator[dict[str, Any]]:
        """One record per image, in the result format of DESIGN.md, streamed in chunks.

        With no scan, every image's latest version (an object whose content changed has one row
        per etag; only the newest is reported). With ``key``, only images of that key.
        """
        newer = images.alias("newer")
        query = select(images, scans.c.source).join(scans, images.c.scan_id == scans.c.id).order_by(images.c.id)
        if key is not None:
            query = query.where(images.c.key == key)
        if scan_id is not None:
            query = query.where(images.c.scan_id == scan_id)
        else:
            query = query.where(
                ~exists().where(
                    newer.c.bucket == images.c.bucket,
                    newer.c.key == images.c.key,
                    newer.c.backend == images.c.backend,
                    newer.c.id > images.c.id,
                )
            )
        last_id = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(query.where(images.c.id > last_id).limit(CHUNK_SIZE)).all()
                if not rows:
                    return
                faces_by_image: dict[int, list] = {}
                for face in conn.execute(
                    select(faces).where(faces.c.image_id.in_([r.id for r in rows])).order_by(faces.c.face_index)
                ):
                    faces_by_image.setdefault(face.image_id, []).append(face)
            for row in rows:
                yield _record(row, faces_by_image.get(row.id, []))
            last_id = rows[-1].id


def _listing_state(scan) -> str:
    if scan.listing_error:
        return "listing failed"
    # scans made before listing_finished_at existed were listed in full before anything ran
    return "listed" if scan.listing_finished_at or scan.finished_at else "listing"


def _unserved(scan, last_processed_at: datetime | None, queued: int) -> str | None:
    """Why a worker handed this scan's batches back, unless an image was processed since."""
    if not queued or scan.unserved_at is None:
        return None
    if last_processed_at is not None and aware_utc(last_processed_at) > aware_utc(scan.unserved_at):
        return None
    return scan.unserved_reason


#: The state of an image queued by a scan: new, or listed again after it failed or was left queued.
_QUEUED_AFRESH: dict[str, Any] = dict(
    status=QUEUED,
    attempts=0,
    error_code=None,
    error_message=None,
    retries=0,
    retry_since=None,
    claimed_by=None,
    claimed_at=None,
    not_before=None,
)

#: A chunk of listed objects in one statement (arrays, not a thousand bound rows); returns the
#: (key, etag) of each row it inserted.
_POSTGRESQL_INSERT_NEW = text("""
INSERT INTO images (scan_id, bucket, key, etag, size, backend, status, attempts, queued_at)
SELECT :scan_id, :bucket, listed.key, listed.etag, listed.size, :backend, 'queued', 0, :now
  FROM unnest(CAST(:keys AS text[]), CAST(:etags AS text[]), CAST(:sizes AS bigint[])) AS listed(key, etag, size)
ON CONFLICT ON CONSTRAINT uq_images_natural_key DO NOTHING
RETURNING key, etag
""")


def _known_objects(conn, bucket: str, backend: str, keys: Sequence[str]) -> dict[tuple[str, str], Any]:
    """The rows (id, status) of the given keys already recorded for this bucket and backend, by (key, etag)."""
    rows = conn.execute(
        select(images.c.id, images.c.key, images.c.etag, images.c.status).where(
            images.c.bucket == bucket, images.c.backend == backend, images.c.key.in_(list(keys))
        )
    )
    return {(row.key, row.etag): row for row in rows}


def _save_outcomes_portable(conn, outcomes, ids, face_rows, now) -> set[int]:
    """SQLAlchemy Core statements that any dialect runs (SQLite); returns the batch's scan ids."""
    image_updates = [
        dict(
            b_id=o.image_id,
            b_status=o.status,
            b_width=o.width,
            b_height=o.height,
            b_code=o.error_code,
            b_message=o.error_message,
            b_now=None if o.deferred else now,
            b_paid=o.paid_calls,
            b_saved=o.calls_saved,
            b_attempts=o.attempts,
            b_retries=o.retries,
            b_since=o.retry_since,
            b_not_before=o.not_before,
            b_hash=o.content_hash,
        )
        for o in outcomes
    ]
    updated = conn.execute(
        update(images)
        .where(images.c.id == bindparam("b_id"))
        .values(
            status=bindparam("b_status"),
            width=bindparam("b_width"),
            height=bindparam("b_height"),
            error_code=bindparam("b_code"),
            error_message=bindparam("b_message"),
            processed_at=bindparam("b_now"),
            paid_calls=func.coalesce(bindparam("b_paid", type_=Integer), images.c.paid_calls),
            calls_saved=func.coalesce(bindparam("b_saved", type_=Integer), images.c.calls_saved),
            attempts=func.coalesce(bindparam("b_attempts", type_=Integer), images.c.attempts),
            retries=func.coalesce(bindparam("b_retries", type_=Integer), images.c.retries),
            retry_since=func.coalesce(bindparam("b_since", type_=DateTime(timezone=True)), images.c.retry_since),
            not_before=bindparam("b_not_before", type_=DateTime(timezone=True)),
            content_hash=func.coalesce(bindparam("b_hash", type_=String), images.c.content_hash),
            claimed_by=None,
        ),
        image_updates,
    )
    _check_all_found(updated.rowcount, ids)
    conn.execute(delete(faces).where(faces.c.image_id.in_(ids)))
    if face_rows:
        conn.execute(dialect_insert(conn.engine, faces).on_conflict_do_nothing(), face_rows)  # (image, index)
    return set(conn.execute(select(images.c.scan_id).where(images.c.id.in_(ids)).distinct()).scalars())


def _save_outcomes_postgresql(conn, outcomes, ids, face_values, now) -> set[int]:
    """The same writes in three round trips; returns the batch's scan ids.

    1. Open the transaction and update the image rows (the batch travels as one JSON document that
       PostgreSQL expands with ``json_to_recordset``), returning their scans; every image must be
       found, which is what keeps a face from ever pointing at no image (``faces.image_id`` has no
       foreign key: see ``worker/schema.py``).
    2. Delete the batch's faces and ``COPY`` the new ones in: the rows stream as COPY text, made
       while the server inserts the rows already sent, so its work and ours overlap.
    3. Commit.
    """
    image_rows = [
        {
            "id": o.image_id,
            "status": o.status,
            "width": o.width,
            "height": o.height,
            "error_code": o.error_code,
            "error_message": o.error_message,
            "paid_calls": o.paid_calls,
            "calls_saved": o.calls_saved,
            "attempts": o.attempts,
            "retries": o.retries,
            "retry_since": o.retry_since,
            "not_before": o.not_before,
            "content_hash": o.content_hash,
        }
        for o in outcomes
    ]
    parameters = {"images": orjson.dumps(image_rows).decode(), "ids": ids, "now": now}
    dbapi_connection = conn.connection.dbapi_connection
    statement, copy_text = _POSTGRESQL_UPDATE_IMAGES, _CopyText(face_values)
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(statement, parameters)
            scan_ids = [scan_id for (scan_id,) in cursor.fetchall()]
            _check_all_found(len(scan_ids), ids)
            statement = _POSTGRESQL_REPLACE_FACES
            cursor.copy_expert(cursor.mogrify(statement, parameters).decode(), copy_text, size=_COPY_CHUNK)
            statement = "COMMIT"
            cursor.execute(statement)
        return set(scan_ids)
    except BaseException as exc:
        # The transaction was opened by hand, so SQLAlchemy does not know to end it: roll it back
        # here (or drop the connection), whatever failed, before the connection goes back to the pool.
        disconnected = _roll_back_or_discard(conn, exc)
        if copy_text.error is not None:  # psycopg2 reports it as a cancelled query, which would be retried
            raise copy_text.error from None
        if isinstance(exc, dbapi_connection.Error):  # as SQLAlchemy reports it: what the retries catch
            raise DBAPIError.instance(
                statement, None, exc, dbapi_connection.Error, connection_invalidated=disconnected, dialect=conn.dialect
            ) from exc
        raise


def _roll_back_or_discard(conn, exc: BaseException) -> bool:
    """End the failed transaction; True when the connection is gone (and discarded)."""
    dbapi_connection = conn.connection.dbapi_connection
    if not (isinstance(exc, dbapi_connection.Error) and conn.dialect.is_disconnect(exc, dbapi_connection, None)):
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("ROLLBACK")
            return False
        except dbapi_connection.Error:
            pass
    conn.invalidate(exc)
    return True


_COPY_CHUNK = 64 * 1024
_COPY_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str | None) -> str:
    """A text value in PostgreSQL's COPY text format: ``\\N`` for NULL, backslashes and controls escaped."""
    return "\\N" if value is None else value.translate(_COPY_TEXT_ESCAPES)


def _copy_number(value: float | None) -> str:
    return "\\N" if value is None else repr(value)


def _copy_json(value: Any) -> str:
    """JSON has no raw tab or newline (orjson escapes them), so only its backslashes need doubling."""
    return "\\N" if value is None else orjson.dumps(value).decode().replace("\\", "\\\\")


def _copy_line(values: tuple) -> str:
    """One face row (``_FACE_COLUMNS`` order) as a COPY text line; written out for speed."""
    image_id, index, name, person_id, match, confidence, left, top, width, height, urls, gender, landmarks, details = (
        values
    )
    return (
        f"{image_id}\t{index}\t{_copy_text(name)}\t{_copy_text(person_id)}\t{_copy_number(match)}\t"
        f"{_copy_number(confidence)}\t{left!r}\t{top!r}\t{width!r}\t{height!r}\t{_copy_json(urls)}\t"
        f"{_copy_text(gender)}\t{_copy_json(landmarks)}\t{_copy_json(details)}\n"
    )


class _CopyText:
    """Face rows as a file of COPY text lines, made as psycopg2 reads it (so never all in memory).

    An error while making a line is kept in ``error``: psycopg2 turns it into ``QueryCanceled``.
    """

    def __init__(self, rows: Iterable[tuple]) -> None:
        self._lines = map(_copy_line, rows)
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> str:
        chunk, length = [], 0
        try:
            for line in self._lines:
                chunk.append(line)
                length += len(line)
                if length >= size > 0:
                    break
        except BaseException as exc:
            self.error = exc
            raise
        return "".join(chunk)


def _finish_scans_statement():
    newest_queued = (
        select(images.c.id)
        .where(images.c.scan_id == scans.c.id, images.c.status == QUEUED)
        .order_by(images.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return (
        update(scans)
        .where(
            scans.c.id.in_(bindparam("scan_ids", expanding=True)),
            scans.c.finished_at.is_(None),
            scans.c.listing_finished_at.is_not(None) | scans.c.listing_error.is_not(None),
            newest_queued.is_(None),
        )
        .values(finished_at=bindparam("now"))
    )


#: Built once: constructing it costs more than running it (about 1 ms per batch).
_FINISH_SCANS = _finish_scans_statement()


def _finish_scans_if_drained(conn, scan_ids: Iterable[int]) -> None:
    """One statement, run in autocommit mode (no BEGIN and COMMIT round trips)."""
    conn.execute(_FINISH_SCANS, {"scan_ids": list(scan_ids), "now": utcnow()})


_FACE_COLUMNS = (
    "image_id",
    "face_index",
    "name",
    "person_id",
    "match_confidence",
    "face_confidence",
    "box_left",
    "box_top",
    "box_width",
    "box_height",
    "urls",
    "known_gender",
    "landmarks",
    "details",
)

#: Sent on an autocommit connection, so the transaction is opened here. A batch touches its own
#: rows by key, where a sequential scan is never right; without statistics (a young table, before
#: autovacuum's first ANALYZE) the planner picks one anyway: over 15,000 faces that was 4 ms a batch.
_POSTGRESQL_UPDATE_IMAGES = """
BEGIN;
SET LOCAL enable_seqscan = off;
UPDATE images SET status = u.status, width = u.width, height = u.height, error_code = u.error_code,
       error_message = u.error_message, processed_at = CASE WHEN u.status = 'queued' THEN NULL ELSE %(now)s END,
       paid_calls = COALESCE(u.paid_calls, images.paid_calls),
       calls_saved = COALESCE(u.calls_saved, images.calls_saved),
       attempts = COALESCE(u.attempts, images.attempts), retries = COALESCE(u.retries, images.retries),
       retry_since = COALESCE(u.retry_since, images.retry_since), not_before = u.not_before, claimed_by = NULL,
       content_hash = COALESCE(u.content_hash, images.content_hash)
  FROM json_to_recordset(%(images)s::json)
       AS u(id integer, status text, width integer, height integer, error_code text, error_message text,
            paid_calls integer, calls_saved integer, attempts integer, retries integer, retry_since timestamptz,
            not_before timestamptz, content_hash text)
 WHERE images.id = u.id AND images.id = ANY(%(ids)s)
RETURNING images.scan_id
"""

#: One message: COPY ends it and waits for the face rows.
_POSTGRESQL_REPLACE_FACES = f"""
DELETE FROM faces WHERE image_id = ANY(%(ids)s);
COPY faces ({", ".join(_FACE_COLUMNS)}) FROM STDIN
"""


def _face_values(image_id: int, result: RecognitionResult) -> list[tuple]:
    """A result's face rows as tuples in ``_FACE_COLUMNS`` order."""
    rows: list[tuple] = []
    for index, celebrity in enumerate(result.celebrities):
        box = celebrity.bounding_box
        rows.append(
            (
                image_id,
                index,
                celebrity.name,
                celebrity.id,
                celebrity.match_confidence,
                celebrity.face_confidence,
                box.left,
                box.top,
                box.width,
                box.height,
                list(celebrity.urls),
                celebrity.known_gender,
                (celebrity.raw.get("Face") or {}).get("Landmarks"),
                _celebrity_details(celebrity.raw),
            )
        )
    offset = len(rows)
    for index, face in enumerate(result.unrecognized_faces, start=offset):
        box = face.bounding_box
        rows.append(
            (
                image_id,
                index,
                None,
                None,
                None,
                face.confidence,
                box.left,
                box.top,
                box.width,
                box.height,
                None,
                None,
                face.raw.get("Landmarks"),
                _without(face.raw, _FACE_FIELDS_IN_COLUMNS),
            )
        )
    return rows


def _face_rows(image_id: int, result: RecognitionResult) -> list[dict[str, Any]]:
    return [dict(zip(_FACE_COLUMNS, values, strict=True)) for values in _face_values(image_id, result)]


#: Fields of the vendor's face records that have their own columns; ``details`` keeps the rest
#: (pose, quality, emotions, smile, and whatever the service adds), so nothing is stored twice.
_CELEBRITY_FIELDS_IN_COLUMNS = frozenset({"Name", "Id", "Urls", "MatchConfidence", "KnownGender"})
_FACE_FIELDS_IN_COLUMNS = frozenset({"BoundingBox", "Confidence", "Landmarks"})


def _without(record: Mapping[str, Any], fields: frozenset) -> dict:
    return {key: value for key, value in record.items() if key not in fields}


def _celebrity_details(raw: Mapping[str, Any]) -> dict:
    details = _without(raw, _CELEBRITY_FIELDS_IN_COLUMNS)
    if isinstance(details.get("Face"), dict):
        details["Face"] = _without(details["Face"], _FACE_FIELDS_IN_COLUMNS)
    return details


def _stored_box(face) -> dict[str, float]:
    return BoundingBox(face.box_left, face.box_top, face.box_width, face.box_height).to_dict()


def _record(row, face_rows) -> dict[str, Any]:
    error = {"code": row.error_code, "message": row.error_message} if row.status == FAILED else None
    return {
        "scan_id": row.scan_id,
        "source": row.source,
        "key": row.key,
        "etag": row.etag,
        "status": row.status,
        "error": error,
        "backend": row.backend,
        "width": row.width,
        "height": row.height,
        "celebrities": [
            {
                "name": f.name,
                "id": f.person_id,
                "match_confidence": round(f.match_confidence, 2),
                "bounding_box": _stored_box(f),
                "urls": f.urls or [],
            }
            for f in face_rows
            if f.name is not None
        ],
        "unrecognized_faces": [
            {"bounding_box": _stored_box(f), "confidence": round(f.face_confidence or 0.0, 2)}
            for f in face_rows
            if f.name is None
        ],
    }
