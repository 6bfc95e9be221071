"""The results store: scans, images and faces in SQLite or PostgreSQL (SQLAlchemy 2 Core).

The store is the one object the CLI and workers hold; it queues what a listing found (this
module) and hands the rest to ``worker.database`` (engines, schema), ``worker.outcomes`` (a
batch's writes) and ``worker.reports`` (reading results back). Images are unique on their
natural key (bucket, key, etag, backend), so listing the same object twice queues it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import (
    Engine,
    bindparam,
    func,
    select,
    text,
    update,
)

from worker import person_counts
from worker.database import (
    CHUNK_SIZE,
    aware_utc,
    chunks,
    connect,
    dialect_insert,
    utcnow,
)
from worker.errors import ConfigurationError
from worker.findings import PersonFound, people_found, result_records
from worker.outcomes import (
    ImageOutcome,
    KnownPicture,
    QueuedImage,
    face_row_dicts,
    face_values,
    finish_scans_if_drained,
    write_outcomes_portable,
    write_outcomes_postgresql,
)
from worker.reports import (
    ResultRecord,
    ScanProgress,
    ScanSummary,
    listing_state,
    unserved_reason,
)
from worker.retry import retry_database
from worker.schema import DONE, FAILED, QUEUED, STATUSES, faces, images, listing_parts, person_images, scans
from worker.settings import Settings


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
        reuse_results: bool = True,
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
                    reuse_results=reuse_results,
                )
                .returning(scans.c.id)
            ).scalar_one()

    def done_objects(self, bucket: str, backend: str, keys: Sequence[str]) -> set[tuple[str, str]]:
        """(key, etag) of the given keys already ``done`` with this backend: what a scan would skip."""
        with self.engine.connect() as conn:
            return {known for known, row in _known_objects(conn, bucket, backend, keys).items() if row.status == DONE}

    def seconds_per_image(self, backend: str, sample: int = 10_000) -> float | None:
        """A worker process's mean time per recognized image, over the latest ``sample`` images the
        backend recognized (copies and prefiltered images excluded); None before the first."""
        latest = (
            select(images.c.work_ms)
            .where(
                images.c.backend == backend,
                images.c.status == DONE,
                images.c.work_ms.is_not(None),
                images.c.copied_from.is_(None),
                images.c.calls_saved == 0,
            )
            .order_by(images.c.id.desc())
            .limit(sample)
            .subquery()
        )
        with self.engine.connect() as conn:
            mean = conn.execute(select(func.avg(latest.c.work_ms))).scalar()
        return None if mean is None else float(mean) / 1000

    @retry_database
    def known_pictures(self, pictures: Sequence[tuple[str, int]], backend: str) -> dict[tuple[str, int], KnownPicture]:
        """Of the given (MD5, size) pairs, those of pictures already recognized with ``backend``
        (the first image of each), in one query."""
        hashes = sorted({content_hash for content_hash, _ in pictures})
        if not hashes:
            return {}
        first = (
            select(func.min(images.c.id))
            .where(images.c.content_hash.in_(hashes), images.c.backend == backend, images.c.status == DONE)
            .group_by(images.c.content_hash, images.c.size)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(images.c.content_hash, images.c.size, images.c.id, images.c.width, images.c.height).where(
                    images.c.id.in_(first)
                )
            )
            known = {(row.content_hash, row.size): KnownPicture(row.id, row.width, row.height) for row in rows}
        return {picture: known[picture] for picture in pictures if picture in known}

    def queue_images(
        self,
        scan_id: int,
        bucket: str,
        backend: str,
        listed: Iterable[Listed],
        *,
        force: bool = False,
        keep_ids: bool = True,
        ended: bool = True,
    ) -> QueueReport:
        """Record every listed object as ``queued`` in this scan, except those already done.

        An object already done with the same etag is skipped (never paid for twice) unless
        ``force``; one that failed or was left queued by an interrupted scan is queued again. Each
        chunk is committed as it is listed, so workers claim images while the listing goes on; at
        the end the listing is marked finished (and the scan too, if nothing is left queued).
        ``keep_ids`` returns the queued ids (tests and small jobs; a scan keeps none in memory).
        ``ended=False`` leaves the listing open (the workers list the rest: ``worker/listing_parts.py``).
        """
        image_ids: list[int] = []
        total = skipped = 0
        for chunk in chunks(listed, CHUNK_SIZE):
            with self.engine.begin() as conn:
                ids, chunk_skipped = self.queue_chunk(conn, scan_id, bucket, backend, chunk, force, keep_ids)
                total, skipped = total + len(chunk), skipped + chunk_skipped
                # the counts so far, with the chunk: status shows the listing's progress
                conn.execute(update(scans).where(scans.c.id == scan_id).values(listed=total, skipped=skipped))
            image_ids += ids
        if not ended:
            return QueueReport(image_ids=image_ids, listed=total, skipped=skipped)
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

    def queue_chunk(self, conn, scan_id, bucket, backend, chunk, force, keep_ids) -> tuple[list[int], int]:
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
        if requeue:  # (--force) done images keep their faces until done again: their counts move along
            person_counts.subtract(conn, requeue)
            conn.execute(
                update(images).where(images.c.id.in_(requeue)).values(scan_id=scan_id, queued_at=now, **_QUEUED_AFRESH)
            )
            person_counts.add(conn, requeue)
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
                    scans.c.reuse_results,
                )
                .join(scans, images.c.scan_id == scans.c.id)
                .where(images.c.id.in_(list(image_ids)), images.c.status == QUEUED)
                .order_by(images.c.id)
            )
            return [QueuedImage(**row._mapping) for row in rows]

    def known_picture(self, content_hash: str, size: int, backend: str) -> KnownPicture | None:
        """The first image recognized by ``backend`` whose bytes have this MD5 and size, if any."""
        return self.known_pictures([(content_hash, size)], backend).get((content_hash, size))

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
            rows = [row for o in outcomes if o.result for row in face_row_dicts(o.image_id, o.result)]
            with self.engine.begin() as conn:
                return write_outcomes_portable(conn, outcomes, ids, rows, now)
        face_tuples = (values for o in outcomes if o.result for values in face_values(o.image_id, o.result))
        with self.engine.begin() as conn:
            return write_outcomes_postgresql(conn, outcomes, ids, face_tuples, now)

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
            finish_scans_if_drained(conn, scan_ids)

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
            scan.id: unserved_reason(scan, last.get(scan.id), counts.get(scan.id, {}).get(QUEUED, 0)) for scan in notes
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
            last, paid_calls, calls_saved, reused = conn.execute(
                select(
                    func.max(images.c.processed_at),
                    func.coalesce(func.sum(images.c.paid_calls), 0),
                    func.coalesce(func.sum(images.c.calls_saved), 0),
                    func.count(images.c.copied_from),
                ).where(in_scan)
            ).one()
            # With a broker, the workers list the key space in parts, each counting what it listed.
            parts, parts_ended, parts_listed, parts_skipped = conn.execute(
                select(
                    func.count(),
                    func.count().filter(listing_parts.c.status != QUEUED),
                    func.coalesce(func.sum(listing_parts.c.listed), 0),
                    func.coalesce(func.sum(listing_parts.c.skipped), 0),
                ).where(listing_parts.c.scan_id == scan_id)
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
            found = func.sum(person_images.c.images)
            people: dict[str, int] = dict(
                conn.execute(  # type: ignore[arg-type]  # rows of (name, count)
                    select(person_images.c.name, found)
                    .where(person_images.c.scan_id == scan_id)
                    .group_by(person_images.c.name)
                    .having(found > 0)
                    .order_by(person_images.c.name)
                ).all()
            )
        return ScanSummary(
            id=scan.id,
            source=scan.source,
            backend=scan.backend,
            created_at=scan.created_at,
            finished_at=scan.finished_at,
            listed=scan.listed + int(parts_listed),
            skipped=scan.skipped + int(parts_skipped),
            counts=counts,
            faces=face_count,
            people=people,
            failures=failures,
            last_processed_at=last,
            paid_calls=int(paid_calls),
            calls_saved=int(calls_saved),
            reused=int(reused),
            retrying=retrying,
            unserved=unserved_reason(scan, last, counts[QUEUED]),
            listing=listing_state(scan),
            listing_error=scan.listing_error,
            listing_parts=(parts_ended, parts) if parts else None,
        )

    def result_records(
        self, scan_id: int | None = None, key: str | None = None, persons: Sequence[str] = (), limit: int | None = None
    ) -> Iterator[ResultRecord]:
        """One record per image, streamed (see :func:`worker.findings.result_records`)."""
        return result_records(self.engine, scan_id, key, persons, limit)

    def people(self, scan_id: int | None = None, limit: int | None = None) -> list[PersonFound]:
        """Everyone found, most images first (see :func:`worker.findings.people_found`)."""
        return people_found(self.engine, scan_id, limit)


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
    copied_from=None,
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
