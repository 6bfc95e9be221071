"""A listing part's lifecycle: queued (to list) ──claim──▶ listing by T ──page…──▶ done | failed.

A scan's source is listed in parts (a prefix of an S3 key space, or a whole folder), each resumed
after the last key it recorded. A part is held by a claim token ``T`` with a lease that every page
(and the holder's lease keeper) renews; another holder takes it over only once the lease ran out.
Every transition is one statement guarded by the claim, and a page is recorded only if the part
still ends where the holder last left it (``last_key``): a replayed page, or a page from a holder
that lost the part, changes nothing. The page, the part's counts and, for its last page, the end
of the scan's listing (when no other part is left) are one transaction: no crash falls between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, and_, delete, func, or_, select, update

from worker.database import utcnow
from worker.queue import scans as scan_states
from worker.queue.images import ImageQueue
from worker.retry import retry_database
from worker.schema import DONE, FAILED, QUEUED, listing_parts, scans
from worker.sources import Source


@dataclass(frozen=True)
class PartClaim:
    """A part held by one run: where its listing stands."""

    id: int
    scan_id: int
    source: Source
    backend: str
    prefix: str
    last_key: str | None
    force: bool
    token: str
    inventory: bool = False  # the scan reads an S3 Inventory: only its scan command lists it

    @property
    def bucket(self) -> str:
        return self.source.bucket


@dataclass(frozen=True)
class PartsProgress:
    total: int
    done: int
    failed: int

    @property
    def ended(self) -> int:
        return self.done + self.failed


def held(part: PartClaim):
    """The fence: the part is still to list and held by ``part.token``."""
    return and_(
        listing_parts.c.id == part.id, listing_parts.c.claimed_by == part.token, listing_parts.c.status == QUEUED
    )


class ListingParts:
    """The ``listing_parts`` table: creating, claiming, recording and ending a scan's parts."""

    def __init__(self, engine: Engine, lease_seconds: float = 120.0) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)
        self.images = ImageQueue(engine, lease_seconds)

    def create(
        self, conn, scan_id: int, prefixes: Sequence[str], force: bool = False, claimed_by: str | None = None
    ) -> list[int]:
        """One part per prefix, to list (in the caller's transaction), held by ``claimed_by`` if
        given; returns their ids in prefix order."""
        if not prefixes:
            return []
        claim = dict(claimed_by=claimed_by, claimed_at=utcnow()) if claimed_by else {}
        rows = conn.execute(
            listing_parts.insert().returning(listing_parts.c.id, sort_by_parameter_order=True),
            [dict(scan_id=scan_id, prefix=prefix, force=force, status=QUEUED, **claim) for prefix in prefixes],
        )
        return [row.id for row in rows]

    def split(self, conn, part: PartClaim, prefixes: Sequence[str]) -> list[int] | None:
        """Replace the part, which its holder has not begun to list, by one part per prefix (in the
        caller's transaction). None, changing nothing, when ``part.token`` no longer holds it: its
        lease ran out and another holder lists it now."""
        taken = conn.execute(delete(listing_parts).where(held(part), listing_parts.c.last_key.is_(None))).rowcount
        if not taken:
            return None
        return self.create(conn, part.scan_id, prefixes, part.force)

    def hold(self, conn, part: PartClaim) -> bool:
        """Renew the part's lease in the caller's transaction; False when ``part.token`` lost it."""
        return bool(conn.execute(update(listing_parts).where(held(part)).values(claimed_at=utcnow())).rowcount)

    def end(self, conn, part: PartClaim) -> bool:
        """The part is listed (its holder read it whole: an inventory), and with it perhaps the scan's
        listing, in the caller's transaction; False when ``part.token`` lost it."""
        ended = conn.execute(update(listing_parts).where(held(part)).values(status=DONE, claimed_at=utcnow())).rowcount
        if ended:
            scan_states.lock_scan(conn, part.scan_id)
            scan_states.end_listing_if_parts_ended(conn, part.scan_id)
        return bool(ended)

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
        """Hold the part for ``token``, unless it ended or another live holder has it."""
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
            scan = conn.execute(
                select(scans.c.source, scans.c.backend, scans.c.inventory).where(scans.c.id == row.scan_id)
            ).one()
        source = Source.from_url(scan.source)
        return PartClaim(
            part_id, row.scan_id, source, scan.backend, row.prefix, row.last_key, row.force, token, bool(scan.inventory)
        )

    def listed_by_workers(self, scan_id: int) -> bool:
        """Whether the scan's parts may be listed by any worker: an S3 key space (a folder may not
        be on the workers' machines; an inventory is read by the scan command)."""
        with self.engine.connect() as conn:
            scan = conn.execute(select(scans.c.source, scans.c.inventory).where(scans.c.id == scan_id)).one()
        return Source.from_url(scan.source).is_s3 and scan.inventory is None

    def scan_of(self, part_id: int) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(listing_parts.c.scan_id).where(listing_parts.c.id == part_id)).scalar()

    @retry_database
    def claim_next(self, scan_id: int, token: str) -> PartClaim | None:
        """Another part of the scan to list: one nobody holds, or whose lease ran out."""
        now = utcnow()
        with self.engine.connect() as conn:
            candidate_ids = list(
                conn.execute(
                    select(listing_parts.c.id)
                    .where(listing_parts.c.scan_id == scan_id, self._claimable(token, now))
                    .order_by(listing_parts.c.id)
                    .limit(8)
                ).scalars()
            )
        for candidate in candidate_ids:  # another run may take one first: try the next
            part = self.claim(candidate, token)
            if part is not None:
                return part
        return None

    @retry_database
    def record_page(self, part: PartClaim, objects: list, last_key: str | None, ended: bool) -> PartClaim | None:
        """Queue one page of the part's objects and move its last key on, in one transaction; at
        the part's last page, also end the scan's listing if no other part is left.

        Returns the part as it now stands, or None (having recorded nothing) when ``part.token``
        no longer holds it where it left it: its lease ran out and another holder lists it now. A
        replay of a page that was recorded (its commit's acknowledgement was lost) finds the part
        moved on by this very page and returns it as recorded.
        """
        now = utcnow()
        new_last_key = last_key if last_key is not None else part.last_key
        with self.engine.begin() as conn:
            values: dict = dict(claimed_at=now, last_key=new_last_key)
            if ended:
                values["status"] = DONE
            moved_on = conn.execute(
                update(listing_parts)
                .where(held(part), listing_parts.c.last_key.is_not_distinct_from(part.last_key))
                .values(**values)
            ).rowcount
            if moved_on:
                self._record(conn, part, objects, ended)
                recorded: PartClaim | None = dataclasses.replace(part, last_key=new_last_key)
            else:
                recorded = self._replayed(conn, part, new_last_key, ended)
        if recorded is not None and ended:  # nothing may be left to do (all skipped, a budget spent)
            scan_states.Scans(self.engine).finish_if_drained([part.scan_id])
        return recorded

    def _record(self, conn, part: PartClaim, objects: list, ended: bool) -> None:
        """The page's objects and the part's counts; at its last page, the end of the listing."""
        if objects:
            recorded = self.images.record(conn, part.scan_id, part.bucket, part.backend, objects, part.force)
            conn.execute(
                update(listing_parts)
                .where(listing_parts.c.id == part.id)
                .values(
                    listed=listing_parts.c.listed + recorded.listed,
                    skipped=listing_parts.c.skipped + recorded.skipped,
                    held_elsewhere=listing_parts.c.held_elsewhere + recorded.held_elsewhere,
                )
            )
            scan_states.count_handed_over(conn, recorded.moved)
        if ended:
            scan_states.lock_scan(conn, part.scan_id)
            scan_states.end_listing_if_parts_ended(conn, part.scan_id)

    def _replayed(self, conn, part: PartClaim, new_last_key: str | None, ended: bool) -> PartClaim | None:
        row = conn.execute(
            select(listing_parts.c.claimed_by, listing_parts.c.last_key, listing_parts.c.status).where(
                listing_parts.c.id == part.id
            )
        ).one_or_none()
        if (
            row is not None
            and row.claimed_by == part.token
            and row.last_key == new_last_key
            and row.status == (DONE if ended else QUEUED)
        ):
            return dataclasses.replace(part, last_key=new_last_key)
        return None

    @retry_database
    def release(self, part: PartClaim) -> None:
        """Let go of the part (the slice ended; the next holder claims it afresh)."""
        with self.engine.begin() as conn:
            conn.execute(update(listing_parts).where(held(part)).values(claimed_by=None))

    @retry_database
    def release_all(self, token: str) -> None:
        """Let go of every part ``token`` holds (its run ended with an error)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(listing_parts)
                .where(listing_parts.c.claimed_by == token, listing_parts.c.status == QUEUED)
                .values(claimed_by=None)
            )

    @retry_database
    def fail(self, part: PartClaim, reason: str) -> None:
        """The part cannot be listed (access denied, bucket gone): it ends ``failed``, and the
        scan's listing with it once no other part is left to list (in the same transaction)."""
        with self.engine.begin() as conn:
            failed = conn.execute(
                update(listing_parts).where(held(part)).values(status=FAILED, error=reason[:2000])
            ).rowcount
            if failed:
                scan_states.lock_scan(conn, part.scan_id)
                scan_states.end_listing_if_parts_ended(conn, part.scan_id)
        if failed:
            scan_states.Scans(self.engine).finish_if_drained([part.scan_id])

    def is_open(self, part_id: int) -> bool:
        """Whether the part is still to list."""
        with self.engine.connect() as conn:
            status = conn.execute(select(listing_parts.c.status).where(listing_parts.c.id == part_id)).scalar()
        return status == QUEUED

    def unstarted_root(self, scan_id: int) -> int | None:
        """The scan's one part when it is the whole source and nothing of it was listed yet (the
        scan command died before it split or listed it): ``--resume`` takes it over, to split it."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(listing_parts.c.id, listing_parts.c.status, listing_parts.c.last_key)
                .where(listing_parts.c.scan_id == scan_id)
                .limit(2)
            ).all()
        if len(rows) == 1 and rows[0].status == QUEUED and rows[0].last_key is None:
            return rows[0].id
        return None

    def unfinished(self, scan_id: int) -> list[int]:
        """The parts of the scan still to list (``scan --resume`` sends them again; a part a live
        holder lists is left to it: the message for it finds it held and helps with the others)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(listing_parts.c.id)
                    .where(listing_parts.c.scan_id == scan_id, listing_parts.c.status == QUEUED)
                    .order_by(listing_parts.c.id)
                ).scalars()
            )

    def progress(self, scan_id: int) -> PartsProgress | None:
        """How many of the scan's parts are listed (None: the scan has no parts)."""
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


def renew(conn, tokens: list[str], now) -> None:
    conn.execute(
        update(listing_parts)
        .where(listing_parts.c.claimed_by.in_(tokens), listing_parts.c.status == QUEUED)
        .values(claimed_at=now)
    )
