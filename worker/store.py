"""The results store: scans, images and faces in SQLite or PostgreSQL (SQLAlchemy 2 Core).

The store is the one object the CLI and workers hold. The queue of record's transitions live in
``worker/queue/`` (an image's, a listing part's, a scan's), each module the one owner of its
lifecycle; this module records a listing that one process reads whole (an S3 Inventory, tests)
through them, and reads results back (``worker.findings``, ``worker.read_models``). Images are
unique on their natural key (bucket, key, etag, backend), so listing the same object twice
queues it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Engine, func, select

from worker.database import CHUNK_SIZE, aware_utc, chunks, connect
from worker.errors import ConfigurationError, ListingTakenOverError
from worker.findings import PersonFound, people_found, result_records
from worker.media.video import VIDEO
from worker.outcomes import KnownPicture
from worker.queue import scans as scan_states
from worker.queue.images import ImageQueue, done_objects
from worker.queue.parts import ListingParts, PartClaim
from worker.queue.scans import Scans
from worker.queue.slots import WINDOW_KEEPER, WindowSlots
from worker.queue.videos import JobFigures, job_figures
from worker.read_models import (
    ResultRecord,
    ScanProgress,
    ScanSummary,
    listing_state,
    unserved_reason,
)
from worker.retry import retry_database
from worker.schema import (
    DONE,
    FAILED,
    QUEUED,
    STATUSES,
    faces,
    images,
    keepers,
    listing_parts,
    person_images,
    person_videos,
    refused_writes,
    scans,
)
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
    held_elsewhere: int = 0


class ResultStore:
    def __init__(self, engine: Engine, lease_seconds: float = 120.0) -> None:
        self.engine = engine
        #: The claims' lease (CELEBSCAN_LEASE_SECONDS): a summary tells which window slots lapsed.
        self.lease_seconds = lease_seconds

    @property
    def images(self) -> ImageQueue:
        """The images as a queue, with the default lease (workers build theirs from settings)."""
        return ImageQueue(self.engine)

    @classmethod
    def connect(cls, url: str, lease_seconds: float = 120.0) -> ResultStore:
        return cls(connect(url), lease_seconds)

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultStore:
        """The store of ``settings``, with credentials from Secrets Manager when a secret is set."""
        from worker.database_secret import database_url

        return cls.connect(database_url(settings), settings.lease_seconds)

    # -- producer side -------------------------------------------------------------------------

    def create_scan(self, source: str, backend: str, **options) -> int:
        return Scans(self.engine).create(source, backend, **options)

    def done_objects(self, bucket: str, backend: str, keys: Sequence[str]) -> set[tuple[str, str]]:
        """(key, etag) of the given keys already ``done`` with this backend: what a scan would skip."""
        with self.engine.connect() as conn:
            return done_objects(conn, bucket, backend, keys)

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
                images.c.media.is_(None),  # a video's steps are not an image's call
            )
            .order_by(images.c.id.desc())
            .limit(sample)
            .subquery()
        )
        with self.engine.connect() as conn:
            mean = conn.execute(select(func.avg(latest.c.work_ms))).scalar()
        return None if mean is None else float(mean) / 1000

    @retry_database
    def known_pictures(
        self, pictures: Sequence[tuple[str, int]], backend: str, scan_id: int | None = None, forced: bool = False
    ) -> dict[tuple[str, int], KnownPicture]:
        """Of the given (MD5, size) pairs, those of pictures already recognized with ``backend``
        (the first image of each), in one query, for an image of scan ``scan_id``: any scan's
        results, or with ``forced`` only those recognized since that scan began (a ``--force`` scan
        recognizes each picture afresh once). An image that another scan's ``--force`` queued again
        still knows its picture's earlier result until it is done again."""
        hashes = sorted({content_hash for content_hash, _ in pictures})
        if not hashes:
            return {}
        recognized = [images.c.content_hash.in_(hashes), images.c.backend == backend]
        kept = (images.c.status == QUEUED) & images.c.processed_at.is_not(None) & (images.c.scan_id != scan_id)
        recognized.append((images.c.status == DONE) | kept)
        if forced:  # recognized since the forced scan began (here, or by a later --force since)
            began = select(scans.c.created_at).where(scans.c.id == scan_id).scalar_subquery()
            recognized.append(images.c.processed_at >= began)
        first = select(func.min(images.c.id)).where(*recognized).group_by(images.c.content_hash, images.c.size)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(images.c.content_hash, images.c.size, images.c.id, images.c.width, images.c.height).where(
                    images.c.id.in_(first)
                )
            )
            known = {(row.content_hash, row.size): KnownPicture(row.id, row.width, row.height) for row in rows}
        return {picture: known[picture] for picture in pictures if picture in known}

    def known_picture(
        self, content_hash: str, size: int, backend: str, scan_id: int | None = None, forced: bool = False
    ) -> KnownPicture | None:
        """The first image recognized by ``backend`` whose bytes have this MD5 and size, if any
        (for an image of scan ``scan_id``: see :meth:`known_pictures`)."""
        return self.known_pictures([(content_hash, size)], backend, scan_id, forced).get((content_hash, size))

    def queue_images(
        self,
        scan_id: int,
        bucket: str,
        backend: str,
        listed: Iterable[Listed],
        *,
        force: bool = False,
        keep_ids: bool = True,
        lease_seconds: float = 120.0,
        part: PartClaim | None = None,
        listed_at: datetime | None = None,
    ) -> QueueReport:
        """Record a listing that this process reads whole (an S3 Inventory) in scan ``scan_id``,
        a chunk per transaction, and end the scan's listing with the last chunk.

        Each object is recorded as :meth:`ImageQueue.record` says (new: queued; done: skipped
        unless ``force``; ...). The scan's figures are set, not added, from the running totals, so
        a listing read again from the start (``scan --resume`` of an interrupted one) ends with
        the right ones. ``keep_ids`` returns the queued ids (tests and small jobs). With ``part``
        (the listing part the scan command holds for the whole source), each chunk renews its claim
        and is recorded only while it holds it (else :class:`ListingTakenOverError`), and the last
        chunk ends the part with it. ``listed_at``: when the listing saw these objects (an
        inventory's report was made; None: now), which undoes only deletions older than that.
        """
        queue = ImageQueue(self.engine, lease_seconds)
        parts = ListingParts(self.engine, lease_seconds)
        report = QueueReport([], 0, 0)

        def record(chunk: list | None, ends: bool) -> None:
            nonlocal report
            with self.engine.begin() as conn:
                if part is not None and not parts.hold(conn, part):
                    raise ListingTakenOverError(f"another process lists scan {scan_id} now; this one stops")
                if chunk:
                    recorded = queue.record(conn, scan_id, bucket, backend, chunk, force, keep_ids, listed_at=listed_at)
                    report = QueueReport(
                        report.image_ids + recorded.image_ids,
                        report.listed + recorded.listed,
                        report.skipped + recorded.skipped,
                        report.held_elsewhere + recorded.held_elsewhere,
                    )
                    scan_states.count_handed_over(conn, recorded.moved)
                    scan_states.set_listing_counts(conn, scan_id, report.listed, report.skipped, report.held_elsewhere)
                if ends and part is not None:  # with the last chunk: no crash falls between the two
                    parts.end(conn, part)
                elif ends:
                    scan_states.end_listing(conn, scan_id)

        pending = chunks(listed, CHUNK_SIZE)
        chunk = next(pending, None)
        while chunk is not None:
            try:
                following = next(pending, None)
            except Exception:  # the listing stopped part-way: what it read is kept
                record(chunk, ends=False)
                raise
            record(chunk, ends=following is None)
            chunk = following
        if not report.listed:
            record(None, ends=True)
        Scans(self.engine).finish_if_drained([scan_id])
        return report

    def finish_scans(self, scan_ids: Iterable[int]) -> None:
        Scans(self.engine).finish_if_drained(scan_ids)

    # -- reading -------------------------------------------------------------------------------

    def refused_writes(self) -> int:
        """Late writes refused because their run had lost its claim (``celebscan metrics``)."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(refused_writes)).scalar_one()

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
        windows = WindowSlots(self.engine, self.lease_seconds).states([i for i, done in finished.items() if not done])
        return [
            ScanProgress(
                scan_id,
                finished[scan_id],
                counts[scan_id],
                last.get(scan_id),
                unserved.get(scan_id),
                windows.get(scan_id),
            )
            for scan_id in finished
        ]

    def keeper_seen_at(self) -> datetime | None:
        """When the fleet's window keeper last renewed its lease (None: no worker ever kept it)."""
        with self.engine.connect() as conn:
            held_at = conn.execute(select(keepers.c.held_at).where(keepers.c.name == WINDOW_KEEPER)).scalar()
        return aware_utc(held_at) if held_at is not None else None

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
            counts, videos = _by_status(conn, in_scan)
            last, paid_calls, calls_saved, reused, deleted = conn.execute(
                select(
                    func.max(images.c.processed_at),
                    func.coalesce(func.sum(images.c.paid_calls), 0),
                    func.coalesce(func.sum(images.c.calls_saved), 0),
                    func.count(images.c.copied_from),
                    func.count(images.c.deleted_at),
                ).where(in_scan)
            ).one()
            # A source listed in parts: each part counts what it listed.
            parts, parts_ended, parts_listed, parts_skipped, parts_held, listed_at = conn.execute(
                select(
                    func.count(),
                    func.count().filter(listing_parts.c.status != QUEUED),
                    func.coalesce(func.sum(listing_parts.c.listed), 0),
                    func.coalesce(func.sum(listing_parts.c.skipped), 0),
                    func.coalesce(func.sum(listing_parts.c.held_elsewhere), 0),
                    func.max(listing_parts.c.claimed_at).filter(listing_parts.c.status == QUEUED),
                ).where(listing_parts.c.scan_id == scan_id)
            ).one()
            # Calls paid by runs whose late writes were refused (they lost their claim): still paid.
            refused, refused_calls = conn.execute(
                select(func.count(), func.coalesce(func.sum(refused_writes.c.paid_calls), 0)).where(
                    refused_writes.c.scan_id == scan_id
                )
            ).one()
            failures: dict[str, int] = {}
            retrying: dict[str, int] = {}
            for status, code, count in conn.execute(
                select(images.c.status, images.c.error_code, func.count())
                .where(in_scan, images.c.status.in_([FAILED, QUEUED]), images.c.error_code.is_not(None))
                .group_by(images.c.status, images.c.error_code)
            ):
                (failures if status == FAILED else retrying)[code] = count
            has_videos = any(videos.values())  # a scan of images alone asks nothing more of them
            jobs = job_figures(conn, scan_id) if has_videos else JobFigures(0, 0, 0)
            face_join = faces.join(images, faces.c.image_id == images.c.id)
            face_count = conn.execute(select(func.count()).select_from(face_join).where(in_scan)).scalar_one()
            people = _people_counted(conn, person_images, person_images.c.images, scan_id)
            people_in_videos = (
                _people_counted(conn, person_videos, person_videos.c.videos, scan_id) if has_videos else {}
            )
        window = WindowSlots(self.engine, self.lease_seconds).states([scan_id]).get(scan_id)
        return ScanSummary(
            id=scan.id,
            source=scan.source,
            backend=scan.backend,
            created_at=scan.created_at,
            finished_at=scan.finished_at,
            listed=scan.listed + int(parts_listed),
            skipped=scan.skipped + int(parts_skipped),
            held_elsewhere=scan.held_elsewhere + int(parts_held),
            handed_over=scan.handed_over,
            refused_writes=int(refused),
            listing_active_at=aware_utc(listed_at) if listed_at is not None else None,
            counts=counts,
            faces=face_count,
            people=people,
            failures=failures,
            last_processed_at=last,
            paid_calls=int(paid_calls) + int(refused_calls) + scan.handed_over_paid_calls,
            calls_saved=int(calls_saved) + scan.handed_over_calls_saved,
            reused=int(reused),
            retrying=retrying,
            unserved=unserved_reason(scan, last, counts[QUEUED]),
            listing=listing_state(scan),
            listing_error=scan.listing_error,
            listing_parts=(parts_ended, parts) if parts else None,
            standing=bool(scan.standing),
            followed_at=aware_utc(scan.followed_at) if scan.followed_at is not None else None,
            events=scan.events,
            deletions=scan.deletions,
            deleted=int(deleted),
            window=window,
            keeper_at=self.keeper_seen_at(),
            videos=videos if has_videos else {},
            people_in_videos=people_in_videos,
            video_jobs_running=jobs.running_here,
            video_jobs_running_fleet=jobs.running,
            video_minutes=jobs.started_ms / 60_000,
        )

    def result_records(
        self,
        scan_id: int | None = None,
        key: str | None = None,
        persons: Sequence[str] = (),
        limit: int | None = None,
        include_deleted: bool = False,
    ) -> Iterator[ResultRecord]:
        """One record per image, streamed (see :func:`worker.findings.result_records`)."""
        return result_records(self.engine, scan_id, key, persons, limit, include_deleted)

    def people(
        self, scan_id: int | None = None, limit: int | None = None, include_deleted: bool = False
    ) -> list[PersonFound]:
        """Everyone found, most images first (see :func:`worker.findings.people_found`)."""
        return people_found(self.engine, scan_id, limit, include_deleted)


def _by_status(conn, condition) -> tuple[dict[str, int], dict[str, int]]:
    """How many rows of ``images`` meeting ``condition`` are in each status, and of them videos (one query)."""
    counts, videos = dict.fromkeys(STATUSES, 0), dict.fromkeys(STATUSES, 0)
    for status, media, count in conn.execute(
        select(images.c.status, images.c.media, func.count()).where(condition).group_by(images.c.status, images.c.media)
    ):
        counts[status] += count
        if media == VIDEO:
            videos[status] += count
    return counts, videos


def _people_counted(conn, table, count, scan_id: int) -> dict[str, int]:
    """Each name found in the scan with its kept count (``person_images``' images, ``person_videos``' videos)."""
    total = func.sum(count)
    rows = conn.execute(
        select(table.c.name, total)
        .where(table.c.scan_id == scan_id)
        .group_by(table.c.name)
        .having(total > 0)
        .order_by(table.c.name)
    ).all()
    return {name: int(found) for name, found in rows}
