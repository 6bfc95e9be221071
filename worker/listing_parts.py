"""Listing a bucket on the workers: its key space in parts, each listed a slice at a time.

With a broker, ``celebscan scan s3://...`` splits the key space (``worker.listing.split_key_space``),
records one ``listing_parts`` row per part and sends one ``celebscan.list_part`` message per part, then
returns: the fleet lists the bucket in parallel, as many parts at once as it has processes.

A worker lists its part for at most ``LIST_SLICE_SECONDS`` and sends the part on as a new message, so
a message never outlives the broker's visibility timeout and listing and recognition take turns on
every worker (they are on two queues, which a worker serves in turn). A part that ends before the
slice does is followed, for two seconds more, by other parts nobody is listing, so many small
parts cost few messages and recognition still gets its turns. Each page of keys is recorded
with the part's last key in one transaction; a part picked up again lists on after that key, so a
worker dying mid-part loses nothing and doubles nothing. A message holds its part by a claim (its
message id and retry number, as image claims); a claim that no page refreshed for the lease is
taken over, and ``celebscan scan --resume`` releases them all and sends the unfinished parts again.

The listing of the scan ends when no part is left to list: ``listing_finished_at`` is set (or
``listing_error``, with the failed parts' reasons), and the scan finishes once its images are done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, and_, func, or_, select, update

from worker.aws import AWS_ERRORS, translate
from worker.database import utcnow
from worker.errors import CelebscanError, TransientError
from worker.listing import ListedObject, images_in
from worker.retry import call_with_retry, retry_database
from worker.schema import DONE, FAILED, QUEUED, listing_parts, scans
from worker.sources import Source
from worker.store import ResultStore

log = logging.getLogger(__name__)

#: How long one message lists its part before sending the part on.
LIST_SLICE_SECONDS = 10.0
#: How long a message goes on with other parts once its own has ended.
STEAL_SECONDS = 2.0
#: A part whose listing outlasted the in-process retries (throttling, 5xx) is sent on after this.
TRANSIENT_PAUSE_SECONDS = 30.0


@dataclass(frozen=True)
class PartClaim:
    """A part held by one message: where its listing stands."""

    id: int
    scan_id: int
    bucket: str
    backend: str
    prefix: str
    last_key: str | None
    force: bool
    token: str


@dataclass(frozen=True)
class PartStep:
    """What one slice did: images recorded, and which part to send on and when (``next_in`` None:
    nothing to send on: the parts it listed ended, or another message holds them)."""

    listed: int
    next_in: float | None
    part_id: int | None = None


@dataclass(frozen=True)
class PartsProgress:
    total: int
    done: int
    failed: int

    @property
    def ended(self) -> int:
        return self.done + self.failed


class ListingParts:
    """The ``listing_parts`` table: creating, claiming, recording and ending a scan's parts."""

    def __init__(self, store: ResultStore, lease_seconds: float = 3600.0) -> None:
        self.store = store
        self.engine: Engine = store.engine
        self.lease = timedelta(seconds=lease_seconds)

    def create(self, scan_id: int, prefixes: Sequence[str], force: bool = False) -> list[int]:
        """One part per prefix, to list; returns their ids in prefix order."""
        if not prefixes:
            return []
        with self.engine.begin() as conn:
            rows = conn.execute(
                listing_parts.insert().returning(listing_parts.c.id, sort_by_parameter_order=True),
                [dict(scan_id=scan_id, prefix=prefix, force=force, status=QUEUED) for prefix in prefixes],
            )
            return [row.id for row in rows]

    def _claimable(self, token: str, now):
        """Parts still to list that ``token`` may hold: nobody's, its own, or a lapsed claim."""
        return and_(
            listing_parts.c.status == QUEUED,
            or_(
                listing_parts.c.claimed_by.is_(None),
                listing_parts.c.claimed_by == token,
                listing_parts.c.claimed_at < now - self.lease,
            ),
        )

    @retry_database
    def claim(self, part_id: int, token: str) -> PartClaim | None:
        """Hold the part for the message ``token``, unless it ended or another live message holds it."""
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(
                update(listing_parts)
                .where(listing_parts.c.id == part_id, self._claimable(token, now))
                .values(claimed_by=token, claimed_at=now)
                .returning(
                    listing_parts.c.scan_id, listing_parts.c.prefix, listing_parts.c.last_key, listing_parts.c.force
                )
            ).one_or_none()
            if row is None:
                return None
            scan = conn.execute(select(scans.c.source, scans.c.backend).where(scans.c.id == row.scan_id)).one()
        bucket = Source.from_url(scan.source).bucket
        return PartClaim(part_id, row.scan_id, bucket, scan.backend, row.prefix, row.last_key, row.force, token)

    def scan_of(self, part_id: int) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(listing_parts.c.scan_id).where(listing_parts.c.id == part_id)).scalar()

    @retry_database
    def claim_next(self, scan_id: int, token: str) -> PartClaim | None:
        """Another part of the scan to list: first one this message's token held (a redelivered
        message picks up what it was listing), else one nobody holds or whose lease ran out."""
        now = utcnow()
        with self.engine.connect() as conn:
            candidates = conn.execute(
                select(listing_parts.c.id)
                .where(listing_parts.c.scan_id == scan_id, self._claimable(token, now))
                .order_by((listing_parts.c.claimed_by == token).desc(), listing_parts.c.id)
                .limit(8)
            ).scalars()
            candidate_ids = list(candidates)
        for candidate in candidate_ids:  # another message may take one first: try the next
            part = self.claim(candidate, token)
            if part is not None:
                return part
        return None

    @retry_database
    def record_page(self, part: PartClaim, objects: list[ListedObject], last_key: str | None, ended: bool) -> bool:
        """Queue one page of the part's objects and move its last key on, in one transaction.

        Returns False (and records nothing) when the part is no longer held by ``part.token``: its
        lease ran out and another message lists it now.
        """
        with self.engine.begin() as conn:
            values: dict = dict(claimed_at=utcnow(), listed=listing_parts.c.listed + len(objects))
            if last_key is not None:
                values["last_key"] = last_key
            if ended:
                values.update(status=DONE, claimed_by=None)
            held = conn.execute(
                update(listing_parts)
                .where(listing_parts.c.id == part.id, listing_parts.c.claimed_by == part.token)
                .values(**values)
            ).rowcount
            if not held:
                return False
            if objects:
                _, skipped = self.store.queue_chunk(
                    conn, part.scan_id, part.bucket, part.backend, objects, part.force, keep_ids=False
                )
                if skipped:
                    conn.execute(
                        update(listing_parts)
                        .where(listing_parts.c.id == part.id)
                        .values(skipped=listing_parts.c.skipped + skipped)
                    )
        return True

    @retry_database
    def release(self, part: PartClaim) -> None:
        """Let go of the part (the slice ended; the next message claims it afresh)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(listing_parts)
                .where(listing_parts.c.id == part.id, listing_parts.c.claimed_by == part.token)
                .values(claimed_by=None)
            )

    @retry_database
    def fail(self, part: PartClaim, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(listing_parts)
                .where(listing_parts.c.id == part.id, listing_parts.c.claimed_by == part.token)
                .values(status=FAILED, error=reason[:2000], claimed_by=None)
            )

    @retry_database
    def end_listing_if_done(self, scan_id: int) -> bool:
        """When no part of the scan is left to list, record that its listing ended (or how it
        failed) and finish the scan if nothing is queued. Run after each part ends, after its commit,
        so the last of several parts ending at once always sees them all ended."""
        with self.engine.begin() as conn:
            if conn.execute(
                select(listing_parts.c.id).where(listing_parts.c.scan_id == scan_id, listing_parts.c.status == QUEUED)
            ).first():
                return False
            errors = conn.execute(
                select(listing_parts.c.prefix, listing_parts.c.error)
                .where(listing_parts.c.scan_id == scan_id, listing_parts.c.status == FAILED)
                .order_by(listing_parts.c.id)
            ).all()
            pending = and_(
                scans.c.id == scan_id, scans.c.listing_finished_at.is_(None), scans.c.listing_error.is_(None)
            )
            if errors:
                reason = f"{len(errors)} part(s) of the key space could not be listed; first, {errors[0].prefix!r}: "
                conn.execute(update(scans).where(pending).values(listing_error=(reason + str(errors[0].error))[:2000]))
            else:
                conn.execute(update(scans).where(pending).values(listing_finished_at=utcnow()))
        self.store.finish_scans([scan_id])
        return True

    def unfinished(self, scan_id: int) -> list[int]:
        """The parts of the scan still to list, their claims released (``scan --resume``: their
        messages may be lost; a live one finds its claim gone and stops after its page)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(listing_parts)
                .where(listing_parts.c.scan_id == scan_id, listing_parts.c.status == QUEUED)
                .values(claimed_by=None)
            )
            return list(
                conn.execute(
                    select(listing_parts.c.id)
                    .where(listing_parts.c.scan_id == scan_id, listing_parts.c.status == QUEUED)
                    .order_by(listing_parts.c.id)
                ).scalars()
            )

    def progress(self, scan_id: int) -> PartsProgress | None:
        """How many of the scan's parts are listed (None: the scan was listed in one process)."""
        with self.engine.connect() as conn:
            rows: dict[str, int] = dict(
                conn.execute(  # type: ignore[arg-type]  # rows of (status, count)
                    select(listing_parts.c.status, func.count())
                    .where(listing_parts.c.scan_id == scan_id)
                    .group_by(listing_parts.c.status)
                ).all()
            )
        total = sum(rows.values())
        return PartsProgress(total, rows.get(DONE, 0), rows.get(FAILED, 0)) if total else None


def list_part(
    part_id: int,
    parts: ListingParts,
    s3_client,
    token: str,
    *,
    slice_seconds: float = LIST_SLICE_SECONDS,
    steal_seconds: float = STEAL_SECONDS,
    attempts: int = 5,
    page_size: int = 1000,
) -> PartStep:
    """List one slice: pages of the part's keys until the slice's time is up; a part that ends
    before then is followed, for ``steal_seconds`` more, by other parts of the scan nobody is
    listing (so a bucket of many small parts costs a message per few seconds, not per part, and
    the worker still takes its turns at recognizing).

    A transient S3 error that outlasts ``attempts`` tries pauses the part (sent on later); a
    permanent one (access denied, bucket gone) fails the part, and the scan's listing with it once
    every other part has ended. Returns the part to send on, if any, and when.
    """
    deadline = time.monotonic() + slice_seconds
    part = parts.claim(part_id, token)
    if part is None:  # listed already, or held by another message: help with the scan's other parts
        deadline = min(deadline, time.monotonic() + steal_seconds)
        scan_id = parts.scan_of(part_id)
        part = parts.claim_next(scan_id, token) if scan_id is not None else None
    listed = 0
    while part is not None:
        count, next_in = _list_slice(part, parts, s3_client, deadline, attempts, page_size)
        listed += count
        if next_in is not None:
            return PartStep(listed, next_in, part.id)
        # Other parts only briefly: the worker's next turn may be a batch to recognize.
        deadline = min(deadline, time.monotonic() + steal_seconds)
        if time.monotonic() >= deadline:
            break
        part = parts.claim_next(part.scan_id, token)
    return PartStep(listed, None)


def _list_slice(
    part: PartClaim, parts: ListingParts, s3_client, deadline: float, attempts: int, page_size: int
) -> tuple[int, float | None]:
    """(images recorded, seconds before the part is sent on; None: it ended, failed or is lost)."""
    arguments: dict = {"Bucket": part.bucket, "Prefix": part.prefix, "MaxKeys": page_size}
    if part.last_key is not None:
        arguments["StartAfter"] = part.last_key
    listed = 0

    def next_page() -> dict:
        try:
            return s3_client.list_objects_v2(**arguments)
        except AWS_ERRORS as exc:
            raise translate(exc, f"listing s3://{part.bucket}/{part.prefix}") from exc

    while True:
        try:
            page = call_with_retry(next_page, attempts=attempts)
        except TransientError as exc:
            log.warning("listing part %d (%r) paused: %s", part.id, part.prefix, exc)
            parts.release(part)
            return listed, TRANSIENT_PAUSE_SECONDS
        except CelebscanError as exc:
            log.error("listing part %d (%r) failed: %s", part.id, part.prefix, exc)
            parts.fail(part, str(exc))
            parts.end_listing_if_done(part.scan_id)
            return listed, None
        contents = page.get("Contents", ())
        last_key = contents[-1]["Key"] if contents else None
        ended = not page.get("IsTruncated")
        objects = list(images_in(page))
        if not parts.record_page(part, objects, last_key, ended):
            log.info("listing part %d: another message holds it now", part.id)
            return listed, None
        listed += len(objects)
        if ended:
            parts.end_listing_if_done(part.scan_id)
            return listed, None
        if time.monotonic() >= deadline:
            parts.release(part)
            return listed, 0.0
        arguments.pop("StartAfter", None)
        arguments["ContinuationToken"] = page["NextContinuationToken"]
