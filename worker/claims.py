"""The database is the queue of record; the broker is a bounded window onto it.

A scan's images are recorded ``queued`` as the listing streams in. Instead of one message per batch
of ids, the broker holds a fixed number of *window slots* per scan: small messages that each say
"take the next batch of scan N". A worker handling a slot claims that batch from the database
(atomically: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the write lock on SQLite), processes it, and
sends the slot on. So the broker never holds more than the window, memory is flat in the bucket
size everywhere, and work starts as soon as the first images are recorded.

Claims survive failures:
- a slot's message redelivered after its worker died reclaims the images that message claimed
  (its claim token is the message's id and retry number) and processes them again;
- a claim whose message was lost (a broker restarted without its data) expires after the lease,
  and ``celebscan scan --resume`` releases every claim of the scan at once;
- a deferred image (transient errors) is released with a ``not_before`` time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, exists, func, or_, select, update

from worker.database import aware_utc, utcnow
from worker.schema import DONE, QUEUED, images, scans


@dataclass(frozen=True)
class ClaimState:
    """What a window slot that found nothing to claim needs to know: go on waiting, or stop."""

    finished: bool  # the scan is finished: nothing queued, listing done
    listing: bool  # the listing is still adding images
    in_flight: bool  # images of the scan are claimed by other slots (or deferred) and still queued
    budget_spent: bool  # --max-cost: every image the budget pays for has been handed out
    next_due: datetime | None  # the earliest time a deferred image may be tried again

    @property
    def worth_waiting(self) -> bool:
        """More work may come: images still listed, deferred, or held by slots that may die."""
        return not self.finished and not self.budget_spent and (self.listing or self.in_flight)


class ClaimQueue:
    def __init__(self, engine: Engine, lease_seconds: float = 3600.0) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)

    def claim(self, scan_id: int, default_limit: int, token: str) -> list[int]:
        """The next images of the scan for the message ``token``: first those it already claimed
        (a redelivered message), then queued ones nobody holds, oldest first, within the budget.
        As many as the scan's batch size (``default_limit`` when the scan names none)."""
        now = utcnow()
        with self.engine.begin() as conn:
            postgresql = conn.dialect.name == "postgresql"
            if not postgresql:  # take SQLite's write lock first, so two processes never pick the same rows
                conn.execute(update(scans).where(scans.c.id == scan_id).values(handed_out=scans.c.handed_out))
            budget, batch_size, reuse = conn.execute(
                select(scans.c.budget_images, scans.c.batch_size, scans.c.reuse_results).where(scans.c.id == scan_id)
            ).one()
            limit = batch_size or default_limit
            left = None
            if budget is not None:  # handed_out is counted under the scan's row lock
                handed = conn.execute(
                    select(scans.c.handed_out).where(scans.c.id == scan_id).with_for_update()
                ).scalar_one()
                left = max(0, budget - handed)
            mine = list(
                conn.execute(
                    select(images.c.id).where(
                        images.c.claimed_by == token, images.c.scan_id == scan_id, images.c.status == QUEUED
                    )
                ).scalars()
            )
            wanted = limit - len(mine)
            picked: list[tuple[int, bool]] = []
            if wanted > 0:
                query = (
                    select(images.c.id, images.c.claimed_at.is_(None))
                    .where(
                        images.c.scan_id == scan_id,
                        images.c.status == QUEUED,
                        or_(images.c.claimed_by.is_(None), images.c.claimed_at < now - self.lease),
                        or_(images.c.not_before.is_(None), images.c.not_before <= now),
                    )
                    .order_by(images.c.id)
                )
                query = query.limit(wanted)
                if postgresql:
                    query = query.with_for_update(skip_locked=True, of=images)
                picked = [(image_id, bool(fresh)) for image_id, fresh in conn.execute(query)]
                if left is not None:  # within the budget: fresh images that will cost a call
                    picked = _within_budget(conn, picked, left, reuse)
            if picked:
                conn.execute(
                    update(images)
                    .where(images.c.id.in_([image_id for image_id, _ in picked]))
                    .values(claimed_by=token, claimed_at=now)
                )
            fresh = sum(is_fresh for _, is_fresh in picked)  # copies of known pictures count as not fresh
            if budget is not None and fresh:
                conn.execute(update(scans).where(scans.c.id == scan_id).values(handed_out=scans.c.handed_out + fresh))
        return sorted(mine + [image_id for image_id, _ in picked])

    def release(self, token: str) -> int:
        """Give back what ``token`` claimed and did not finish (it cannot serve them)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(images).where(images.c.claimed_by == token, images.c.status == QUEUED).values(claimed_by=None)
            ).rowcount

    def release_scan(self, scan_id: int) -> int:
        """Give back every claim of the scan (``scan --resume``: the messages may be lost)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(images)
                .where(images.c.claimed_by.is_not(None), images.c.scan_id == scan_id, images.c.status == QUEUED)
                .values(claimed_by=None)
            ).rowcount

    def state(self, scan_id: int) -> ClaimState:
        with self.engine.connect() as conn:
            scan = conn.execute(select(scans).where(scans.c.id == scan_id)).one()
            in_scan_queued = and_(images.c.scan_id == scan_id, images.c.status == QUEUED)
            held = conn.execute(select(exists().where(images.c.claimed_by.is_not(None), in_scan_queued))).scalar()
            next_due = conn.execute(
                select(func.min(images.c.not_before)).where(in_scan_queued, images.c.not_before.is_not(None))
            ).scalar()
        spent = scan.budget_images is not None and scan.handed_out >= scan.budget_images
        return ClaimState(
            finished=scan.finished_at is not None,
            listing=scan.listing_finished_at is None and not scan.listing_error,
            in_flight=bool(held) or next_due is not None,
            budget_spent=spent and not held,
            next_due=aware_utc(next_due) if next_due is not None else None,
        )


def _within_budget(conn, picked: list[tuple[int, bool]], left: int, reuse: bool) -> list[tuple[int, bool]]:
    """The picked images the budget allows, oldest first: those handed out before (already counted),
    copies of pictures already recognized (free: an S3 ETag that is the MD5 of a known picture),
    and up to ``left`` others. Returns (id, counts against the budget)."""
    fresh_ids = [image_id for image_id, fresh in picked if fresh]
    free: set[int] = set()
    if reuse and fresh_ids:
        known = images.alias("known")
        free = set(
            conn.execute(
                select(images.c.id).where(
                    images.c.id.in_(fresh_ids),
                    exists().where(
                        known.c.content_hash == images.c.etag,
                        known.c.size == images.c.size,
                        known.c.backend == images.c.backend,
                        known.c.status == DONE,
                    ),
                )
            ).scalars()
        )
    allowed: list[tuple[int, bool]] = []
    for image_id, fresh in picked:
        if not fresh or image_id in free:
            allowed.append((image_id, False))
        elif left > 0:
            allowed.append((image_id, True))
            left -= 1
    return allowed
