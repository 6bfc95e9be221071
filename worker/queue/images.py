"""An image's lifecycle in the queue of record, and every transition of it.

    listed ──record──▶ queued ──claim──▶ queued, claimed by T ──start──▶ started by T ──write──▶ done | failed
                          ▲                   │        ▲                      │
                          │                   │        └──renew (T's lease)───┘
                          │                   └──release / defer (not_before)──▶ queued
                          └──record by a later scan: failed (retried), done (--force), queued nobody holds

A run of a worker holds its images by a claim token ``T`` (one per run of a message, so two
deliveries of one message never share one) with a lease that the live holder renews
(``worker/queue/leases.py``). Every transition of a claimed image is one statement guarded by
``status = 'queued' AND claimed_by = T``: the token is a fencing token. A holder whose lease ran
out and whose images another holder took changes nothing by writing late; its write is refused,
logged once, and kept in ``refused_writes`` so the call it paid for is still counted. A write that
is replayed (its commit's acknowledgement was lost) finds the receipt its first commit left
(``write_receipts``) and changes nothing either, even if its images moved on meanwhile. A row
goes back from ``done`` or ``failed`` to ``queued`` only when a scan lists it again (a retry of a
failure, or ``--force``), never by a worker.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    Integer,
    String,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import DBAPIError

from worker import person_counts
from worker.database import aware_utc, utcnow
from worker.media.video import VIDEO, media_of
from worker.outcomes import (
    ImageOutcome,
    QueuedImage,
    copy_faces_portable,
    replace_faces_portable,
    stream_faces_postgresql,
)
from worker.queue import pictures
from worker.queue.slots import ENDED
from worker.retry import retry_database
from worker.schema import (
    DONE,
    FAILED,
    QUEUED,
    REMOVED,
    images,
    object_events,
    refused_writes,
    scans,
    window_slots,
    write_receipts,
)
from worker.sql import dialect_insert
from worker.videos import appearances

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimState:
    """What a window slot that found nothing to claim needs to know: go on waiting, or stop."""

    finished: bool  # the scan is finished: nothing queued, listing done
    listing: bool  # the listing is still adding images
    in_flight: bool  # images of the scan are claimed by other runs (or deferred) and still queued
    budget_spent: bool  # --max-cost: every image the budget pays for has been handed out
    next_due: datetime | None  # the earliest time a deferred image may be tried again
    queued: bool = False  # images of the scan are still queued (some may have come since the claim)
    standing: bool = False  # a followed source's scan: images arrive with its bucket's events
    unfollowed: bool = False  # a standing scan still open that nobody followed for a lease

    @property
    def worth_waiting(self) -> bool:
        """More work may come: images still listed, queued, deferred, or held by runs that may die."""
        return not self.finished and not self.budget_spent and (self.listing or self.in_flight or self.queued)


@dataclass(frozen=True)
class Moved:
    """Images a listing took over from other scans, by the scan they left, with the calls those
    images had cost there (they stay in that scan's figures; the images start over at zero)."""

    images: Counter = field(default_factory=Counter)
    paid_calls: Counter = field(default_factory=Counter)
    calls_saved: Counter = field(default_factory=Counter)

    def __add__(self, other: Moved) -> Moved:
        return Moved(
            self.images + other.images, self.paid_calls + other.paid_calls, self.calls_saved + other.calls_saved
        )


@dataclass(frozen=True)
class Recorded:
    """What recording a chunk of a listing did with its objects."""

    listed: int
    skipped: int  # done before (same etag), in another scan
    held_elsewhere: int  # queued in another scan that holds them in flight: left there
    moved: Moved = field(default_factory=Moved)  # images taken over from other scans
    image_ids: list[int] = field(default_factory=list)  # queued in this scan (only when asked for)
    already: int = 0  # this scan's already, left as they are (or queued afresh: own_failures_retried)
    own_failures_retried: int = 0  # of those, failed in this scan and queued again (from_events)


@dataclass(frozen=True)
class Started:
    images: list[QueuedImage]  # started by this run: it works on them
    quarantined: int  # failed at once: runs started them too often without ending
    scan_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Written:
    """What a run's write did: the images it wrote, those a replay found written already, and
    those it no longer held (refused)."""

    written: frozenset[int]
    replayed: frozenset[int]
    refused: frozenset[int]
    scan_ids: frozenset[int]


#: A listing undoes only deletions older than this: one applied while the page was on its way
#: (the object deleted just after S3 listed it) stands.
RESTORE_AFTER = timedelta(seconds=60)
_ANY_DELETED = select(images.c.id).where(images.c.deleted_at.is_not(None)).limit(1)


def restore_deleted(
    conn, bucket: str, versions: Sequence[tuple[str, str]], deleted_before: datetime | None = None, unless=None
) -> list[int]:
    """Rows of these (key, etag) versions marked deleted (by a followed bucket's events) whose object
    is there again, as an event or a listing says: no longer deleted, counted again (any backend;
    ``unless``: a condition on the rows left as they are)."""
    if not versions:
        return []
    restorable = [images.c.bucket == bucket, tuple_(images.c.key, images.c.etag).in_(list(versions))]
    restorable.append(
        images.c.deleted_at.is_not(None) if deleted_before is None else images.c.deleted_at < deleted_before
    )
    if unless is not None:
        restorable.append(~unless)
    rows = conn.execute(
        update(images).where(*restorable).values(deleted_at=None).returning(images.c.id, images.c.media)
    ).all()
    restored = [row.id for row in rows]
    if restored:
        person_counts.add(conn, restored, videos=[row.id for row in rows if row.media == VIDEO])
    return restored


def held_by(token: str):
    """The fence: a queued image that the run ``token`` holds."""
    return and_(images.c.status == QUEUED, images.c.claimed_by == token)


def in_a_live_scan(now: datetime, lease: timedelta):
    """The image's scan is being worked: it has window slots still going (with a broker), or the
    ``scan`` command draining it renewed its lease (without one). A later scan leaves its queued
    images to it, also those no run holds yet (a ``--force`` scan's included)."""
    window_going = exists().where(window_slots.c.scan_id == images.c.scan_id, window_slots.c.state != ENDED)
    live = select(scans.c.id).where(
        scans.c.id == images.c.scan_id,
        scans.c.finished_at.is_(None),
        window_going | (scans.c.drained_at >= now - lease),
    )
    return exists(live)


def _claimable(now: datetime, lease: timedelta):
    """A queued image nobody holds, or whose holder's lease ran out."""
    return and_(images.c.status == QUEUED, or_(images.c.claimed_by.is_(None), images.c.claimed_at < now - lease))


#: A claim of a scan's last images takes 1 / (TAIL_SPLIT x sharers) of them: pictures differ in cost
#: (a 4,000-pixel group photo against a thumbnail), so each process's last share must be small
#: beside what the others may still have to do (measured on faces-dev: docs/performance.md).
TAIL_SPLIT = 2


class ImageQueue:
    """The ``images`` table as a queue: every transition of an image, each one guarded statement."""

    def __init__(self, engine: Engine, lease_seconds: float = 120.0) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)

    # -- listing ---------------------------------------------------------------------------------

    def record(
        self,
        conn,
        scan_id: int,
        bucket: str,
        backend: str,
        chunk: Sequence,
        force: bool,
        keep_ids=False,
        from_events=False,
        listed_at: datetime | None = None,
    ):
        """Record a chunk of listed objects in scan ``scan_id`` (in the caller's transaction).

        A new object is inserted ``queued``. One known already: skipped when it is done (same etag)
        and ``force`` is off; left to another scan that holds it in flight (a live claim); taken
        over when it is queued and nobody holds it (its scan's workers died or were stopped),
        failed (retried) or done with ``force``; and counted as this scan's when it already is (a
        listing resumed lists it again). A listing entry that can never be read is recorded
        ``failed`` at once. Every move is guarded by the state it was seen in.

        A listing of a followed bucket and its events tell of the same objects: the one that saw
        later wins. A deletion of an object the chunk lists is undone when older than when the
        listing saw it (``listed_at``, an inventory's report; None: now) by :data:`RESTORE_AFTER`; a
        version the chunk lists is skipped when an event applied since then says it is gone
        (deleted, or overwritten by another version), as the listing may have seen it just before.
        With ``from_events`` the chunk is the creations a follower applies (``worker/queue/objects.py``,
        which weighs them against the other events itself): none of that, and one that failed in
        this very scan is queued afresh (the object is there again).
        """
        now = utcnow()
        if conn.dialect.name != "postgresql":  # SQLite's write lock first: the reads below stay true
            conn.execute(update(scans).where(scans.c.id == scan_id).values(listed=scans.c.listed))
        gone: set[tuple[str, str]] = set()
        if not from_events:
            seen = now if listed_at is None else min(now, listed_at)
            if conn.execute(_any_event(bucket)).first() is not None:
                gone = _gone_since(conn, bucket, chunk, seen - RESTORE_AFTER)
                chunk = [item for item in chunk if (item.key, item.etag) not in gone]
            if conn.execute(_ANY_DELETED).first() is not None:  # a followed bucket's: the listing says it is back
                listed = [(item.key, item.etag) for item in chunk if not item.error]
                restore_deleted(conn, bucket, listed, deleted_before=seen - RESTORE_AFTER)
        recorded = self._record_chunk(conn, scan_id, bucket, backend, chunk, force, keep_ids, now, from_events)
        if gone:  # listed, and nothing to do: this scan's already (a resumed listing), else skipped
            own = _own_rows(conn, scan_id, bucket, backend, gone)
            return replace(
                recorded,
                listed=recorded.listed + len(gone),
                skipped=recorded.skipped + len(gone) - own,
                already=recorded.already + own,
            )
        return recorded

    def _record_chunk(self, conn, scan_id, bucket, backend, chunk, force, keep_ids, now, from_events):
        if conn.dialect.name == "postgresql" and not any(item.error for item in chunk):
            # One statement inserts what is new (a fresh bucket: everything) and says what it took;
            # only the rest is looked up.
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
                        "medias": [media_of(item.key) for item in chunk],
                    },
                )
            }
            rest = [item for item in chunk if (item.key, item.etag) not in inserted]
            return self._record_known(conn, scan_id, bucket, backend, chunk, rest, force, keep_ids, now, from_events)
        return self._record_known(conn, scan_id, bucket, backend, chunk, chunk, force, keep_ids, now, from_events)

    def _record_known(self, conn, scan_id, bucket, backend, chunk, rest, force, keep_ids, now, from_events) -> Recorded:
        known = _known_objects(conn, bucket, backend, [item.key for item in rest]) if rest else {}
        new_rows: list[dict[str, Any]] = []
        unreadable: list[tuple[int, tuple[str, str]]] = []  # entries that can never be read: failed again
        retried: list[int] = []  # failed, or done with --force: queued afresh
        orphans: list[int] = []  # queued in another scan, nobody holding them
        own_failures: list[int] = []  # failed in this scan, and there again (from_events)
        skipped = held = already = 0
        for item in rest:
            row = known.get((item.key, item.etag))
            if row is None:
                new_rows.append(_new_row(scan_id, bucket, backend, item, now))
            elif row.scan_id == scan_id and from_events and row.status == FAILED and not item.error:
                own_failures.append(row.id)
            elif row.scan_id == scan_id:
                already += 1  # this scan's already (a resumed listing, an event delivered again)
            elif row.status == QUEUED and row.claimed_by is not None and aware_utc(row.claimed_at) >= now - self.lease:
                held += 1
            elif item.error:
                unreadable.append((row.id, item.error))
            elif row.status == QUEUED:
                orphans.append(row.id)
            elif row.status == DONE and not force:
                skipped += 1
            else:
                retried.append(row.id)
        if new_rows:  # one another scan's listing inserted meanwhile is that scan's: left to it
            inserted = conn.execute(
                dialect_insert(self.engine, images).on_conflict_do_nothing().returning(images.c.id), new_rows
            ).all()
            held += len(new_rows) - len(inserted)
        finished = images.c.status != QUEUED
        unheld = _claimable(now, self.lease)
        left_to_nobody = unheld & ~in_a_live_scan(now, self.lease)
        moves = [  # each guarded by the state it was seen in
            (retried, finished, dict(_QUEUED_AFRESH, scan_id=scan_id, queued_at=now, processed_at=_KEPT_IF_DONE)),
            (orphans, left_to_nobody, dict(scan_id=scan_id, claimed_by=None, claimed_at=None, started_by=None)),
        ]
        for row_id, (code, message) in unreadable:
            failed = dict(status=FAILED, error_code=code, error_message=message, processed_at=now)
            moves.append(([row_id], finished | unheld, dict(_QUEUED_AFRESH, scan_id=scan_id, queued_at=now, **failed)))
        own_failures_retried = 0
        if own_failures:  # still failed and this scan's: queued afresh, its calls kept where they were made
            # Still this scan's one row: already in its figures, not listed a second time.
            already += len(own_failures)
            own_failures_retried = conn.execute(
                update(images)
                .where(images.c.id.in_(own_failures), images.c.scan_id == scan_id, images.c.status == FAILED)
                .values(dict(_QUEUED_AFRESH, queued_at=now))
            ).rowcount
        moved = Moved()
        for ids, movable, values in moves:
            taken = _move(conn, ids, scan_id, movable, values)
            held += len(ids) - sum(taken.images.values())  # claimed (or written) meanwhile: left where it is
            moved += taken
        ids_queued: list[int] = []
        if keep_ids:
            ids_queued = list(
                conn.execute(
                    select(images.c.id)
                    .where(
                        images.c.bucket == bucket,
                        images.c.backend == backend,
                        images.c.scan_id == scan_id,
                        images.c.status == QUEUED,
                        images.c.key.in_([item.key for item in chunk]),
                    )
                    .order_by(images.c.id)
                ).scalars()
            )
        return Recorded(len(chunk), skipped, held, moved, ids_queued, already, own_failures_retried)

    # -- claims ----------------------------------------------------------------------------------

    @retry_database
    def claim(self, scan_id: int, default_limit: int, token: str, sharers: int = 1) -> list[int]:
        """Claim the scan's next images for the run ``token``: queued ones nobody holds (or whose
        holder's lease ran out), due, oldest first, within the ``--max-cost`` budget; as many as
        the scan's batch size (``default_limit`` when it names none).

        ``sharers`` processes draining the scan together split its last images: with fewer than
        ``TAIL_SPLIT`` batches each left, a claim takes that share of what is left (factoring, a
        guided self-scheduling), so that they all end within an image or so of each other rather
        than one working a whole batch alone (a local batch of 16 is a second of work)."""
        now = utcnow()
        with self.engine.begin() as conn:
            postgresql = conn.dialect.name == "postgresql"
            if not postgresql:  # take SQLite's write lock first, so two processes never pick the same rows
                conn.execute(_LOCK_SCAN_SQLITE, {"scan_id": scan_id})
            mine = list(conn.execute(_HELD_BY_TOKEN, {"scan_id": scan_id, "token": token}).scalars())
            if mine:  # a replay: this run's claim committed, its answer was lost
                return sorted(mine)
            budget, batch_size, reuse = conn.execute(_CLAIM_SETTINGS, {"scan_id": scan_id}).one()
            left = None
            if budget is not None:  # handed_out is counted under the scan's row lock
                handed = conn.execute(_HANDED_OUT_LOCKED, {"scan_id": scan_id}).scalar_one()
                left = max(0, budget - handed)
            moment = {"scan_id": scan_id, "now": now, "cutoff": now - self.lease}
            candidates = _CANDIDATES_SKIP_LOCKED if postgresql else _CANDIDATES
            limit = batch_size or default_limit
            rows = None
            if sharers > 1:  # the share, counted without locking what others may take
                split = TAIL_SPLIT * sharers
                rows = conn.execute(_CANDIDATES, {**moment, "limit": limit * split}).all()
                limit = max(1, min(limit, -(-len(rows) // split)))
            if rows is None or postgresql:  # PostgreSQL locks the rows it takes, and only those
                rows = conn.execute(candidates, {**moment, "limit": limit}).all()
            picked = [(image_id, bool(fresh)) for image_id, fresh in rows[:limit]]
            if left is not None:  # within the budget: fresh images that will cost a call
                picked = _within_budget(conn, picked, left, reuse)
            if not picked:
                return []
            claimed = list(
                conn.execute(
                    _CLAIM_PICKED, {**moment, "ids": [image_id for image_id, _ in picked], "token": token}
                ).scalars()
            )
            fresh = sum(is_fresh for image_id, is_fresh in picked if image_id in set(claimed))
            if budget is not None and fresh:
                conn.execute(update(scans).where(scans.c.id == scan_id).values(handed_out=scans.c.handed_out + fresh))
        return sorted(claimed)

    @retry_database
    def claim_ids(self, image_ids: Sequence[int], token: str) -> list[int]:
        """Claim the given images for ``token``: those queued that nobody else holds (a batch
        named by its ids: the messages of scans from before the window, and tests)."""
        now = utcnow()
        with self.engine.begin() as conn:
            return sorted(
                conn.execute(
                    update(images)
                    .where(
                        images.c.id.in_(list(image_ids)),
                        _claimable(now, self.lease) | held_by(token),
                    )
                    .values(claimed_by=token, claimed_at=now)
                    .returning(images.c.id)
                ).scalars()
            )

    @retry_database
    def held(self, token: str, image_ids: Sequence[int]) -> list[QueuedImage]:
        """The images of ``image_ids`` that ``token`` still holds, with what a worker needs of them."""
        return self._read(and_(images.c.id.in_(list(image_ids)), held_by(token)))

    def queued(self, image_ids: Sequence[int]) -> list[QueuedImage]:
        """The images of ``image_ids`` still queued, whoever holds them (a read, for tests and tools)."""
        return self._read(and_(images.c.id.in_(list(image_ids)), images.c.status == QUEUED))

    def _read(self, condition) -> list[QueuedImage]:
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
                    images.c.media,
                    images.c.content_hash,
                )
                .join(scans, images.c.scan_id == scans.c.id)
                .where(condition)
                .order_by(images.c.id)
            )
            return [QueuedImage(**row._mapping) for row in rows]

    @retry_database
    def start(self, token: str, batch: Sequence[QueuedImage], max_starts: int) -> Started:
        """Count a start on each image before work on it begins, and quarantine repeat offenders.

        ``attempts`` counts the runs that started an image and never wrote its outcome (a crash,
        a lost lease); a run that ends without crashing gives its count back (a deferral writes
        it back, a release takes it back). The count is committed first, so a worker killed by an
        image still leaves a mark; an image started ``max_starts`` times is failed instead of
        tried again. Only images ``token`` holds are started (the others were taken over).
        """
        poison = [image.id for image in batch if image.attempts >= max_starts]
        live = [image.id for image in batch if image.attempts < max_starts]
        scan_ids: set[int] = set()
        with self.engine.begin() as conn:
            quarantined = 0
            if poison:
                message = f"processing was interrupted {max_starts} times (the image may crash workers)"
                quarantined = conn.execute(
                    update(images)
                    .where(images.c.id.in_(poison), held_by(token), images.c.started_by.is_distinct_from(token))
                    .values(
                        status=FAILED,
                        error_code="Quarantined",
                        error_message=message,
                        processed_at=utcnow(),
                        claimed_by=None,
                        started_by=token,
                    )
                ).rowcount
                scan_ids = {image.scan_id for image in batch if image.id in set(poison)}
            started: set[int] = set()
            if live:
                conn.execute(  # once per run: a replayed start counts nothing twice
                    update(images)
                    .where(images.c.id.in_(live), held_by(token), images.c.started_by.is_distinct_from(token))
                    .values(attempts=images.c.attempts + 1, started_by=token)
                )
                started = set(
                    conn.execute(
                        select(images.c.id).where(images.c.id.in_(live), held_by(token), images.c.started_by == token)
                    ).scalars()
                )
        return Started([image for image in batch if image.id in started], quarantined, frozenset(scan_ids))

    def forget_old_receipts(self, seconds: float) -> int:
        """Write receipts older than ``seconds`` (left by runs that crashed): no replay comes that late."""
        with self.engine.begin() as conn:
            return clear_receipts(conn, older_than=utcnow() - timedelta(seconds=seconds))

    @retry_database
    def discount_starts(self, *tokens: str) -> int:
        """The run was cut short by its time limit, not by its images: the starts it made count
        for nothing, even if the hard limit kills it now (a release or a write then changes no
        count). Returns how many starts were given back."""
        started = and_(
            images.c.status == QUEUED, images.c.claimed_by.in_(tokens), images.c.started_by == images.c.claimed_by
        )
        with self.engine.begin() as conn:
            return conn.execute(
                update(images).where(started).values(started_by=None, attempts=images.c.attempts - 1)
            ).rowcount

    @retry_database
    def release(self, *tokens: str) -> int:
        """Give back what the ``tokens`` (one run's) hold and did not write, in one transaction: the
        run ended (a deadline, an error) without crashing, so the images it started get their start
        count back."""
        held = and_(images.c.status == QUEUED, images.c.claimed_by.in_(tokens))
        with self.engine.begin() as conn:
            released = conn.execute(
                update(images)
                .where(held, images.c.started_by == images.c.claimed_by)
                .values(claimed_by=None, started_by=None, attempts=images.c.attempts - 1)
            ).rowcount
            released += conn.execute(update(images).where(held).values(claimed_by=None)).rowcount
            pictures.release(conn, *tokens)
            clear_receipts(conn, tokens)
        return released

    def state(self, scan_id: int) -> ClaimState:
        """Where the scan stands for a slot that found nothing to claim (one query)."""
        with self.engine.connect() as conn:
            scan = conn.execute(_SCAN_STATE, {"scan_id": scan_id}).one()
        spent = scan.budget_images is not None and scan.handed_out >= scan.budget_images
        listing = scan.listing_finished_at is None and not scan.listing_error
        return ClaimState(
            finished=scan.finished_at is not None,
            listing=listing,
            in_flight=bool(scan.held) or scan.next_due is not None,
            budget_spent=spent and not scan.held,
            next_due=aware_utc(scan.next_due) if scan.next_due is not None else None,
            queued=bool(scan.queued),
            standing=bool(scan.standing),
            unfollowed=bool(scan.standing)
            and listing
            and (scan.followed_at is None or aware_utc(scan.followed_at) < utcnow() - self.lease),
        )

    # -- outcomes --------------------------------------------------------------------------------

    @retry_database
    def write(self, token: str, outcomes: Sequence[ImageOutcome]) -> Written:
        """Write a run's outcomes in one transaction: the images ``token`` still holds are updated
        and their faces replaced; the pictures it held are let go. Images it no longer holds are
        left as they are: a refused write, logged and kept in ``refused_writes`` with the calls it
        paid for. What the write did is kept with it (``write_receipts``): a replay of it (its
        commit's acknowledgement was lost) finds that and changes nothing, whatever happened to its
        images since.
        """
        outcomes = list({outcome.image_id: outcome for outcome in outcomes}.values())  # an image once
        ids = [outcome.image_id for outcome in outcomes]
        now = utcnow()
        with self.engine.begin() as conn:
            if ids and (receipt := _receipt(conn, token, min(ids))) is not None:
                return receipt
            if conn.dialect.name == "postgresql":
                written, scan_ids = _write_postgresql(conn, token, outcomes, ids, now)
            else:
                written, scan_ids = _write_portable(conn, token, outcomes, ids, now)
            if len(written) < len(ids) and (receipt := _receipt(conn, token, min(ids))) is not None:
                return receipt  # the same write, retried while it still ran, committed first
            appearances.replace(conn, {o.image_id: o.appearances or () for o in outcomes if _replaces(o, written)})
            # A deferral that did not land changes nothing and cost nothing: not worth a refusal.
            refused = {
                o.image_id
                for o in outcomes
                if o.image_id not in written and (not o.deferred or o.paid_calls or o.calls_saved)
            }
            if refused:
                _record_refusals(conn, token, [o for o in outcomes if o.image_id in refused], now)
            pictures.release(conn, token)
            if ids:
                conn.execute(
                    write_receipts.insert().values(
                        token=token,
                        first_image=min(ids),
                        written=sorted(written),
                        refused=sorted(refused),
                        scan_ids=sorted(scan_ids),
                        written_at=now,
                    )
                )
        for image_id in sorted(refused):
            log.warning(
                "refused a late write of image %d: run %s no longer holds it (its lease ran out)", image_id, token
            )
        return Written(frozenset(written), frozenset(), frozenset(refused), frozenset(scan_ids))


def _receipt(conn, token: str, first_image: int) -> Written | None:
    """What the write of ``token`` starting at ``first_image`` did, if it committed already: all of
    it replayed now."""
    row = conn.execute(
        select(write_receipts.c.written, write_receipts.c.refused, write_receipts.c.scan_ids).where(
            write_receipts.c.token == token, write_receipts.c.first_image == first_image
        )
    ).one_or_none()
    if row is None:
        return None
    return Written(frozenset(), frozenset(row.written), frozenset(row.refused), frozenset(row.scan_ids))


def clear_receipts(conn, tokens: Sequence[str] = (), older_than: datetime | None = None) -> int:
    """Forget write receipts: a run's, once it released what it held (no write of it can be replayed
    any more), or those older than ``older_than`` (a crashed run's)."""
    condition = write_receipts.c.token.in_(list(tokens)) if tokens else write_receipts.c.written_at < older_than
    return conn.execute(delete(write_receipts).where(condition)).rowcount


def _replaces(outcome: ImageOutcome, written: set[int]) -> bool:
    """A written outcome that replaces a video's appearances: a video done (with them) or failed
    (with none); a deferral has none to give (a --force rescan keeps the last result until then)."""
    return outcome.image_id in written and outcome.appearances is not None


def renew(conn, tokens: list[str], now) -> None:
    """Extend the lease of the images the ``tokens`` hold (see ``worker/queue/leases.py``)."""
    conn.execute(
        update(images).where(images.c.status == QUEUED, images.c.claimed_by.in_(tokens)).values(claimed_at=now)
    )


def _new_row(scan_id: int, bucket: str, backend: str, item, now) -> dict[str, Any]:
    row = dict(
        scan_id=scan_id,
        bucket=bucket,
        key=item.key,
        etag=item.etag,
        size=item.size,
        backend=backend,
        queued_at=now,
        processed_at=None,
        media=media_of(item.key),
        **_QUEUED_AFRESH,
    )
    if item.error:
        row.update(status=FAILED, error_code=item.error[0], error_message=item.error[1], processed_at=now)
    return row


def _move(conn, ids: list[int], scan_id: int, movable, values: dict[str, Any]) -> Moved:
    """Move the images into scan ``scan_id`` if still ``movable`` (they are locked while moved, so a
    claim taken or a write made meanwhile keeps its image where it is); their person counts move
    along, their calls stay in the figures of the scan they leave."""
    if not ids:
        return Moved()
    query = select(images.c.id, images.c.scan_id, images.c.paid_calls, images.c.calls_saved, images.c.media).where(
        images.c.id.in_(ids), images.c.scan_id != scan_id, movable
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=images)
    rows = conn.execute(query).all()
    if not rows:
        return Moved()
    locked = [row.id for row in rows]
    videos = [row.id for row in rows if row.media == VIDEO]
    person_counts.subtract(conn, locked, videos=videos)  # (--force) done images keep their faces until done again
    conn.execute(update(images).where(images.c.id.in_(locked)).values(paid_calls=0, calls_saved=0, **values))
    person_counts.add(conn, locked, videos=videos)
    moved = Moved()
    for row in rows:
        moved.images[row.scan_id] += 1
        moved.paid_calls[row.scan_id] += row.paid_calls
        moved.calls_saved[row.scan_id] += row.calls_saved
    return moved


def _write_portable(conn, token: str, outcomes, ids, now) -> tuple[set[int], set[int]]:
    """SQLAlchemy Core statements that any dialect runs (SQLite): (images written, their scans)."""
    # The write lock first, so the images found held below are still held when updated.
    conn.execute(update(images).where(images.c.id.in_(ids), held_by(token)).values(claimed_at=images.c.claimed_at))
    rows = conn.execute(select(images.c.id, images.c.scan_id).where(images.c.id.in_(ids), held_by(token))).all()
    written = {row.id for row in rows}
    if not written:
        return set(), set()
    mine = [o for o in outcomes if o.image_id in written]

    def added(name: str) -> Any:
        return images.c[name] + bindparam(f"b_{name}", type_=Integer)

    def kept_unless_given(name: str, type_) -> Any:
        return func.coalesce(bindparam(f"b_{name}", type_=type_), images.c[name])

    conn.execute(
        update(images)
        .where(images.c.id == bindparam("b_id"), held_by(token))
        .values(
            status=bindparam("b_status"),
            width=bindparam("b_width"),
            height=bindparam("b_height"),
            error_code=bindparam("b_error_code"),
            error_message=bindparam("b_error_message"),
            processed_at=bindparam("b_now"),
            paid_calls=added("paid_calls"),
            calls_saved=added("calls_saved"),
            attempts=kept_unless_given("attempts", Integer),
            retries=kept_unless_given("retries", Integer),
            retry_since=case(  # retries given as 0: the streak of transient errors ended
                (bindparam("b_retries", type_=Integer) == 0, None),
                else_=kept_unless_given("retry_since", DateTime(timezone=True)),
            ),
            not_before=bindparam("b_not_before", type_=DateTime(timezone=True)),
            content_hash=kept_unless_given("content_hash", String),
            copied_from=bindparam("b_copied_from", type_=Integer),
            work_ms=bindparam("b_work_ms", type_=Integer),
            duration_ms=kept_unless_given("duration_ms", BigInteger),
            claimed_by=None,
            started_by=token,
        ),
        [
            {**{f"b_{name}": value for name, value in o.image_values().items()}, "b_now": None if o.deferred else now}
            for o in mine
        ],
    )
    replace_faces_portable(conn, mine)
    copy_faces_portable(conn, mine)
    return written, {row.scan_id for row in rows}


def _write_postgresql(conn, token: str, outcomes, ids, now) -> tuple[set[int], set[int]]:
    """The same writes on PostgreSQL: the images updated from one JSON document (returning those
    the run still held), then their faces replaced with ``COPY`` (``worker.outcomes``)."""
    dbapi_connection = conn.connection.dbapi_connection
    parameters = {
        "images": orjson.dumps([o.image_values() for o in outcomes]).decode(),
        "ids": ids,
        "now": now,
        "token": token,
    }
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(_POSTGRESQL_UPDATE_IMAGES, parameters)
            rows = cursor.fetchall()
            written = {image_id for image_id, _ in rows}
            if written:
                stream_faces_postgresql(cursor, [o for o in outcomes if o.image_id in written])
        return written, {scan_id for _, scan_id in rows}
    except dbapi_connection.Error as exc:
        # As SQLAlchemy reports it (what the retries catch); a lost connection is dropped from the pool.
        disconnected = conn.dialect.is_disconnect(exc, dbapi_connection, None)
        if disconnected:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            "writing a batch",
            None,
            exc,
            dbapi_connection.Error,
            connection_invalidated=disconnected,
            dialect=conn.dialect,
        ) from exc


def _record_refusals(conn, token: str, outcomes, now) -> None:
    rows = conn.execute(select(images.c.id, images.c.scan_id).where(images.c.id.in_([o.image_id for o in outcomes])))
    scan_of = {row.id: row.scan_id for row in rows}
    conn.execute(
        dialect_insert(conn.engine, refused_writes).on_conflict_do_nothing(),
        [
            dict(
                image_id=o.image_id,
                token=token,
                scan_id=scan_of.get(o.image_id),
                status=o.status,
                paid_calls=o.paid_calls,
                refused_at=now,
            )
            for o in outcomes
        ],
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


def _known_objects(conn, bucket: str, backend: str, keys: Sequence[str]) -> dict[tuple[str, str], Any]:
    """The rows of the given keys already recorded for this bucket and backend, by (key, etag)."""
    rows = conn.execute(
        select(
            images.c.id,
            images.c.key,
            images.c.etag,
            images.c.status,
            images.c.scan_id,
            images.c.claimed_by,
            images.c.claimed_at,
        ).where(images.c.bucket == bucket, images.c.backend == backend, images.c.key.in_(list(keys)))
    )
    return {(row.key, row.etag): row for row in rows}


def _any_event(bucket: str):
    """Whether a follower applied any event of ``bucket`` (cheap: the primary key's first column)."""
    return select(object_events.c.key).where(object_events.c.bucket == bucket).limit(1)


def _gone_since(conn, bucket: str, chunk: Sequence, since: datetime) -> set[tuple[str, str]]:
    """(key, etag) of the chunk's versions that the key's latest event (any backend's; by
    sequencer, then when it was applied), applied at ``since`` or later, says are gone from the
    bucket: a removal, or the creation of another version. (The latest first, then its time: a
    lagging backend's older event applied just now says nothing against a later one.)"""
    keys = [item.key for item in chunk if not item.error]
    if not keys:
        return set()
    columns = [object_events.c[name] for name in ("key", "sequencer", "kind", "etag", "applied_at")]
    events = conn.execute(select(*columns).where(object_events.c.bucket == bucket, object_events.c.key.in_(keys))).all()
    latest: dict[str, Any] = {}
    for event in sorted(events, key=lambda event: (event.sequencer, aware_utc(event.applied_at))):
        latest[event.key] = event  # the later of a key's events last
    return {
        (item.key, item.etag)
        for item in chunk
        if (event := latest.get(item.key)) is not None
        and not item.error
        and aware_utc(event.applied_at) >= since
        and (event.kind == REMOVED or (event.etag is not None and event.etag != item.etag))
    }


def _own_rows(conn, scan_id: int, bucket: str, backend: str, versions: set[tuple[str, str]]) -> int:
    """How many of these (key, etag) versions are rows of scan ``scan_id`` already."""
    return conn.execute(
        select(func.count()).where(
            images.c.scan_id == scan_id,
            images.c.bucket == bucket,
            images.c.backend == backend,
            tuple_(images.c.key, images.c.etag).in_(list(versions)),
        )
    ).scalar_one()


def done_objects(conn, bucket: str, backend: str, keys: Sequence[str]) -> set[tuple[str, str]]:
    """(key, etag) of the given keys already ``done`` with this backend: what a scan would skip."""
    return {known for known, row in _known_objects(conn, bucket, backend, keys).items() if row.status == DONE}


def _claim_statements():
    claimable = and_(
        images.c.status == QUEUED,
        or_(images.c.claimed_by.is_(None), images.c.claimed_at < bindparam("cutoff")),
    )
    candidates = (
        select(images.c.id, images.c.claimed_at.is_(None))
        .where(
            images.c.scan_id == bindparam("scan_id"),
            claimable,
            or_(images.c.not_before.is_(None), images.c.not_before <= bindparam("now")),
        )
        .order_by(images.c.id)
        .limit(bindparam("limit"))
    )
    return (
        select(images.c.id).where(
            images.c.claimed_by == bindparam("token"),
            images.c.status == QUEUED,
            images.c.scan_id == bindparam("scan_id"),
        ),
        update(scans).where(scans.c.id == bindparam("scan_id")).values(handed_out=scans.c.handed_out),
        select(scans.c.budget_images, scans.c.batch_size, scans.c.reuse_results).where(
            scans.c.id == bindparam("scan_id")
        ),
        select(scans.c.handed_out).where(scans.c.id == bindparam("scan_id")).with_for_update(),
        candidates,
        candidates.with_for_update(skip_locked=True, of=images),
        update(images)
        .where(images.c.id.in_(bindparam("ids", expanding=True)), claimable)
        .values(claimed_by=bindparam("token"), claimed_at=bindparam("now"))
        .returning(images.c.id),
    )


#: Built once: every turn of every window slot claims.
(
    _HELD_BY_TOKEN,
    _LOCK_SCAN_SQLITE,
    _CLAIM_SETTINGS,
    _HANDED_OUT_LOCKED,
    _CANDIDATES,
    _CANDIDATES_SKIP_LOCKED,
    _CLAIM_PICKED,
) = _claim_statements()


def _scan_state_statement():
    in_scan_queued = and_(images.c.scan_id == scans.c.id, images.c.status == QUEUED)
    queued = exists().where(in_scan_queued)
    held = exists().where(in_scan_queued, images.c.claimed_by.is_not(None))
    next_due = (
        select(func.min(images.c.not_before)).where(in_scan_queued, images.c.not_before.is_not(None)).scalar_subquery()
    )
    return select(
        scans.c.finished_at,
        scans.c.listing_finished_at,
        scans.c.listing_error,
        scans.c.budget_images,
        scans.c.handed_out,
        scans.c.standing,
        scans.c.followed_at,
        held.label("held"),
        queued.label("queued"),
        next_due.label("next_due"),
    ).where(scans.c.id == bindparam("scan_id"))


#: Built once, as every idle turn of every window slot runs it.
_SCAN_STATE = _scan_state_statement()

#: A done image queued again by ``--force`` keeps when it was done (and its faces) until it is done
#: again: its picture's result is still known (copies elsewhere reuse it); a failure retried does not.
_KEPT_IF_DONE = case((images.c.status == DONE, images.c.processed_at), else_=None)

#: The state of an image queued by a scan: new, or listed again after it failed (or with --force).
_QUEUED_AFRESH: dict[str, Any] = dict(
    status=QUEUED,
    attempts=0,
    error_code=None,
    error_message=None,
    retries=0,
    retry_since=None,
    claimed_by=None,
    claimed_at=None,
    started_by=None,
    not_before=None,
    copied_from=None,
)

#: A chunk of listed objects in one statement (arrays, not a thousand bound rows); returns the
#: (key, etag) of each row it inserted.
_POSTGRESQL_INSERT_NEW = text("""
INSERT INTO images (scan_id, bucket, key, etag, size, backend, status, attempts, queued_at, media)
SELECT :scan_id, :bucket, listed.key, listed.etag, listed.size, :backend, 'queued', 0, :now, listed.media
  FROM unnest(CAST(:keys AS text[]), CAST(:etags AS text[]), CAST(:sizes AS bigint[]), CAST(:medias AS text[]))
       AS listed(key, etag, size, media)
ON CONFLICT ON CONSTRAINT uq_images_natural_key DO NOTHING
RETURNING key, etag
""")

#: The fenced update: only images still queued and held by the run are written. A batch touches
#: its own rows by key, where a sequential scan is never right; without statistics (a young table,
#: before autovacuum's first ANALYZE) the planner picks one anyway: over 15,000 faces that was 4 ms
#: a batch. ``SET LOCAL`` lasts until the transaction ends.
_POSTGRESQL_UPDATE_IMAGES = """
SET LOCAL enable_seqscan = off;
UPDATE images SET status = u.status, width = u.width, height = u.height, error_code = u.error_code,
       error_message = u.error_message, processed_at = CASE WHEN u.status = 'queued' THEN NULL ELSE %(now)s END,
       paid_calls = images.paid_calls + u.paid_calls, calls_saved = images.calls_saved + u.calls_saved,
       attempts = COALESCE(u.attempts, images.attempts), retries = COALESCE(u.retries, images.retries),
       retry_since = CASE WHEN u.retries = 0 THEN NULL ELSE COALESCE(u.retry_since, images.retry_since) END,
       not_before = u.not_before, claimed_by = NULL,
       started_by = %(token)s,
       content_hash = COALESCE(u.content_hash, images.content_hash), copied_from = u.copied_from,
       work_ms = u.work_ms, duration_ms = COALESCE(u.duration_ms, images.duration_ms)
  FROM json_to_recordset(%(images)s::json)
       AS u(id integer, status text, width integer, height integer, error_code text, error_message text,
            paid_calls integer, calls_saved integer, attempts integer, retries integer, retry_since timestamptz,
            not_before timestamptz, content_hash text, copied_from integer, work_ms integer, duration_ms bigint)
 WHERE images.id = u.id AND images.id = ANY(%(ids)s) AND images.status = 'queued' AND images.claimed_by = %(token)s
RETURNING images.id, images.scan_id
"""
