"""The results database: engines for SQLite and PostgreSQL, sessions, schema creation and upgrade."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DefaultClause,
    Engine,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from worker import clock
from worker.errors import ConfigurationError
from worker.schema import metadata

log = logging.getLogger(__name__)

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
    return clock.utcnow()


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


def engine_for(url: str) -> Engine:
    """An engine for ``url`` with celebscan's connection options (the schema left as it is)."""
    url = with_driver(url)
    try:
        engine = create_engine(url, **_engine_options(url))
    except (ArgumentError, ImportError) as exc:
        raise ConfigurationError(f"cannot use database {masked_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    else:  # leases are dated by the server's clock (worker/clock.py)
        event.listen(engine, "first_connect", _align_clock_on_connect)
    return engine


#: How often a process measures its clock against the database server's again.
REALIGN_SECONDS = 300.0


def align_clock(engine: Engine, every: float = REALIGN_SECONDS) -> None:
    """Measure this process's clock against the PostgreSQL server's again if the last measurement
    is older than ``every`` seconds (SQLite's clock is this machine's own). Called by the
    long-lived loops: the lease keepers, the window's keeper, a follower."""
    system = clock.system_clock()
    if engine.dialect.name != "postgresql" or system is None:
        return
    if system.aligned_at is not None and time.monotonic() - system.aligned_at < every:
        return
    with engine.connect() as conn:
        system.align(lambda: conn.execute(_SERVER_TIME).scalar_one())


_SERVER_TIME = text("SELECT extract(epoch FROM clock_timestamp())::float8")


def _align_clock_on_connect(dbapi_connection, _connection_record) -> None:
    system = clock.system_clock()
    if system is None:
        return

    def read_server_time() -> float:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(str(_SERVER_TIME))
            server_time = float(cursor.fetchone()[0])
        dbapi_connection.rollback()  # the connection goes to the pool outside any transaction
        return server_time

    try:
        offset = system.align(read_server_time)
    except Exception as exc:  # the connection itself will say what is wrong
        log.warning("could not read the database server's clock: %s", exc)
        return
    if abs(offset) > 1.0:
        log.warning("this machine's clock is %.1f s off the database server's; leases use the server's", offset)


def connect(url: str) -> Engine:
    """An engine for ``url`` with the schema created; a clean ``ConfigurationError`` if unreachable."""
    engine = engine_for(url)
    url = engine.url.render_as_string(hide_password=False)
    try:
        create_or_upgrade_schema(engine)
    except OperationalError as exc:
        reason = " ".join(str(exc.orig).split())
        raise ConfigurationError(f"cannot reach database {masked_url(url)}: {reason}") from exc
    return engine


#: The PostgreSQL advisory lock (an arbitrary constant: "celebscan") held while the schema is made.
SCHEMA_LOCK = 0x63656C6562


#: Values for columns added to existing rows: scans made before listings were streamed were listed
#: in full before they started; gallery embeddings made before face models were named are dlib's
#: (worker/faces/models.py: re-embedded by `celebscan gallery reembed`, never compared).
_BACKFILL = {
    ("scans", "listing_finished_at"): "UPDATE scans SET listing_finished_at = created_at",
    ("gallery_faces", "model"): "UPDATE gallery_faces SET model = 'dlib-resnet-v1'",
}


def create_or_upgrade_schema(engine: Engine) -> None:
    """Create the tables, or bring a database made by an older celebscan up to date.

    Every process that opens the database runs this (a fleet scaling out from zero starts many at
    once), so on PostgreSQL it runs in one transaction holding an advisory lock: the first process
    creates or upgrades, the others wait, then find nothing left to do. DDL is transactional there,
    so an upgrade is all or nothing.
    """
    from worker import person_counts

    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
        tables = set(inspect(conn).get_table_names())
        metadata.create_all(conn)
        _add_missing_columns_and_indexes(conn)
        if "faces" in tables and "person_images" not in tables:  # made before the counts were kept
            person_counts.backfill(conn)


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


#: A worker's run keeps up to CELEBSCAN_CALLS_IN_FLIGHT threads that each touch the database
#: briefly (a picture's lock, a copy's lookup): connections beyond the pool's 5 open for a burst
#: (a database that stalled a moment) and close again, rather than make a thread wait its turn.
POOL_OVERFLOW = 40


def _engine_options(url: str) -> dict[str, Any]:
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 60}, "max_overflow": POOL_OVERFLOW}
    # psycopg2's plain executemany is one round trip per row; batch the UPDATEs (execute_batch)
    # and the INSERTs (multi-row VALUES) instead.
    return {
        "max_overflow": POOL_OVERFLOW,
        "pool_pre_ping": True,
        "executemany_mode": "values_plus_batch",
        "executemany_batch_page_size": 500,
        "connect_args": {"options": SESSION_OPTIONS},
    }


def _sqlite_pragmas(dbapi_connection, _connection_record) -> None:
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


def aware_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything celebscan writes is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
