"""A scan's lifecycle: created, listing, listed (or listing failed), finished.

Every change of a scan's state is one guarded statement here:
- the listing ends (``listing_finished_at``, or ``listing_error``) only while it has not ended,
  in the transaction that records its last page (so no crash falls between the two);
- a scan finishes only when its listing has ended and nothing of it is queued; this runs after
  each write that may drain it, and when a window slot finds nothing to claim, so a crash right
  after the last write is repaired by the next slot (or by ``scan --resume``);
- ``--resume`` repairs whatever a crash left (:meth:`Scans.repair`) and may run any number of times.

A *standing* scan (``celebscan follow``) has no listing parts: its listing is the bucket's events,
open while a follower renews ``followed_at``, one per source and backend at a time. Its listing
ends, by a window slot or ``--resume``, only when nobody renewed it for a lease (a guarded statement
that the renewal's own row update serializes with), then it finishes once drained like any scan; a
follower that finds its scan ended opens a new one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, and_, bindparam, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from worker.database import utcnow
from worker.queue.slots import open_window
from worker.retry import retry_database
from worker.schema import FAILED, QUEUED, images, listing_parts, scans


@dataclass(frozen=True)
class Repair:
    """What ``scan --resume`` found and set right."""

    listing_ended: bool = False  # every part was listed, but the listing was still open
    finished: bool = False  # nothing was queued, but the scan was still open


class Scans:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        source: str,
        backend: str,
        *,
        prefilter_faces: bool = False,
        budget_images: int | None = None,
        batch_size: int | None = None,
        reuse_results: bool = True,
        inventory: str | None = None,
        window: int | None = None,
    ) -> int:
        with self.engine.begin() as conn:
            return insert_scan(
                conn,
                source,
                backend,
                window,
                prefilter_faces=prefilter_faces,
                budget_images=budget_images,
                batch_size=batch_size,
                reuse_results=reuse_results,
                inventory=inventory,
            )

    @retry_database
    def note_listing_error(self, scan_id: int, reason: str) -> None:
        """The listing stopped part-way: what was listed stays queued (``scan --resume``)."""
        with self.engine.begin() as conn:
            conn.execute(update(scans).where(_listing_open(scan_id)).values(listing_error=reason[:2000]))

    def renew_budget(self, scan_id: int, images_more: int | None) -> None:
        """``--resume``: allow ``images_more`` further images to be handed out (None: all of them)."""
        budget = None if images_more is None else scans.c.handed_out + images_more
        with self.engine.begin() as conn:
            conn.execute(update(scans).where(scans.c.id == scan_id).values(budget_images=budget))

    @retry_database
    def note_unserved(self, scan_id: int, reason: str) -> None:
        """Tell the scan that a worker could not serve its next batch (the slot goes back to the broker)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(scans).where(scans.c.id == scan_id).values(unserved_at=utcnow(), unserved_reason=reason[:2000])
            )

    @retry_database
    def finish_if_drained(self, scan_ids: Iterable[int]) -> None:
        """Finish the scans whose listing ended and of which nothing is queued (one statement)."""
        scan_ids = list(scan_ids)
        if scan_ids:
            with self.engine.begin() as conn:
                conn.execute(_FINISH_SCANS, {"scan_ids": scan_ids, "now": utcnow()})

    def open_standing(self, source: str, backend: str, **options) -> tuple[int, bool]:
        """The open standing scan of ``source`` (its follow renewed), or a new one (and whether it
        is new): two followers starting together share one (a unique index on the open standing
        scans)."""
        while True:
            with self.engine.begin() as conn:
                scan_id = conn.execute(
                    select(scans.c.id).where(
                        scans.c.standing.is_(True),
                        scans.c.source == source,
                        scans.c.backend == backend,
                        scans.c.listing_finished_at.is_(None),
                        scans.c.listing_error.is_(None),
                    )
                ).scalar()
                if scan_id is not None and renew_follow(conn, scan_id):
                    return scan_id, False
            try:
                with self.engine.begin() as conn:
                    return insert_scan(conn, source, backend, standing=True, followed_at=utcnow(), **options), True
            except IntegrityError:  # another follower opened it meanwhile: take that one
                continue

    @retry_database
    def note_draining(self, scan_id: int) -> None:
        """The ``scan`` command draining the scan without a broker is alive (a lease: a later scan
        leaves the scan's queued images to it)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(scans).where(scans.c.id == scan_id, scans.c.finished_at.is_(None)).values(drained_at=utcnow())
            )

    @retry_database
    def give_window(self, scan_id: int, window: int) -> int:
        """Give an unfinished scan its window slots for the workers, if it has none (a scan drained
        without a broker until now, or made before window slots were kept); the window's keeper
        sends them. Returns the scan's window."""
        with self.engine.begin() as conn:  # the row locked first: two callers open the window once
            conn.execute(
                update(scans)
                .where(scans.c.id == scan_id, scans.c.finished_at.is_(None))
                .values(window=func.coalesce(scans.c.window, window), drained_at=None)
            )
            row = conn.execute(select(scans.c.window, scans.c.finished_at).where(scans.c.id == scan_id)).one()
            if row.finished_at is None and row.window:
                open_window(conn, scan_id, row.window)
        return row.window or 0

    @retry_database
    def end_unfollowed(self, scan_id: int, lease_seconds: float) -> bool:
        """End the listing of a standing scan nobody followed for a lease (then it finishes once
        drained). Returns whether this call ended it."""
        with self.engine.begin() as conn:
            return end_unfollowed(conn, scan_id, lease_seconds)

    def repair(self, scan_id: int, lease_seconds: float = 120.0) -> Repair:
        """Set right what a crash left half done (idempotent): a listing whose parts all ended but
        that is still open (or a standing scan's that nobody follows), and a drained scan that is
        still open."""
        with self.engine.begin() as conn:
            lock_scan(conn, scan_id)
            has_parts = conn.execute(select(exists().where(listing_parts.c.scan_id == scan_id))).scalar()
            if has_parts:
                ended = end_listing_if_parts_ended(conn, scan_id)
            else:  # a standing scan's, or a scan's from before listings had parts
                ended = end_unfollowed(conn, scan_id, lease_seconds)
        was_open = self._open(scan_id)
        self.finish_if_drained([scan_id])
        return Repair(listing_ended=ended, finished=was_open and not self._open(scan_id))

    def _open(self, scan_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(scans.c.finished_at).where(scans.c.id == scan_id)).scalar() is None


def insert_scan(conn, source: str, backend: str, window: int | None = None, **options) -> int:
    """A new scan (in the caller's transaction: its listing's first part is made with it), with
    ``window`` slots for the workers when they take its batches from a broker."""
    scan_id = conn.execute(
        scans.insert()
        .values(source=source, backend=backend, created_at=utcnow(), listed=0, skipped=0, window=window, **options)
        .returning(scans.c.id)
    ).scalar_one()
    if window:
        open_window(conn, scan_id, window)
    return scan_id


def renew_follow(conn, scan_id: int, lag_seconds: float | None = None) -> bool:
    """A follower renews its standing scan (in the transaction that records a receive's events,
    first), with the age of the receive's oldest message: False when the scan's listing ended
    meanwhile (nobody followed it for a lease)."""
    values: dict = dict(followed_at=utcnow())
    if lag_seconds is not None:
        values["event_lag_seconds"] = lag_seconds
    return bool(conn.execute(update(scans).where(_listing_open(scan_id)).values(**values)).rowcount)


def end_unfollowed(conn, scan_id: int, lease_seconds: float) -> bool:
    cutoff = utcnow() - timedelta(seconds=lease_seconds)
    unfollowed = scans.c.followed_at.is_(None) | (scans.c.followed_at < cutoff)
    ended = update(scans).where(_listing_open(scan_id), scans.c.standing.is_(True), unfollowed)
    return bool(conn.execute(ended.values(listing_finished_at=utcnow())).rowcount)


def _listing_open(scan_id: int):
    return and_(scans.c.id == scan_id, scans.c.listing_finished_at.is_(None), scans.c.listing_error.is_(None))


def lock_scan(conn, scan_id: int) -> None:
    """Hold the scan's row until the transaction ends: two transactions that may each end the
    listing run one after the other, so the later one sees the earlier's parts ended (on SQLite
    the write lock does this already)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(scans.c.id).where(scans.c.id == scan_id).with_for_update())


def end_listing(conn, scan_id: int) -> None:
    """The listing of the scan ended (in the transaction that recorded its last objects)."""
    conn.execute(update(scans).where(_listing_open(scan_id)).values(listing_finished_at=utcnow()))


def end_listing_if_parts_ended(conn, scan_id: int) -> bool:
    """Within the transaction that ended a part (the scan's row locked first: :func:`lock_scan`):
    when no part of the scan is left to list, record that its listing ended, or how it failed.
    Returns whether this call ended it."""
    if conn.execute(
        select(listing_parts.c.id).where(listing_parts.c.scan_id == scan_id, listing_parts.c.status == QUEUED)
    ).first():
        return False
    errors = conn.execute(
        select(listing_parts.c.prefix, listing_parts.c.error)
        .where(listing_parts.c.scan_id == scan_id, listing_parts.c.status == FAILED)
        .order_by(listing_parts.c.id)
    ).all()
    if errors:
        reason = f"{len(errors)} part(s) of the key space could not be listed; first, {errors[0].prefix!r}: "
        values: dict = dict(listing_error=(reason + str(errors[0].error))[:2000])
    else:
        values = dict(listing_finished_at=utcnow())
    return bool(conn.execute(update(scans).where(_listing_open(scan_id)).values(**values)).rowcount)


def set_listing_counts(conn, scan_id: int, listed: int, skipped: int, held_elsewhere: int) -> None:
    """The figures of what this process recorded of the scan's listing (set, never added: a
    listing read again from its start sets them anew)."""
    conn.execute(
        update(scans).where(scans.c.id == scan_id).values(listed=listed, skipped=skipped, held_elsewhere=held_elsewhere)
    )


def count_handed_over(conn, moved) -> None:
    """Images a listing took over from other scans (``worker.queue.images.Moved``), counted on the
    scans they left with the calls they had cost there (in the listing's transaction)."""
    for scan_id in sorted(moved.images):
        conn.execute(
            update(scans)
            .where(scans.c.id == scan_id)
            .values(
                handed_over=scans.c.handed_over + moved.images[scan_id],
                handed_over_paid_calls=scans.c.handed_over_paid_calls + moved.paid_calls[scan_id],
                handed_over_calls_saved=scans.c.handed_over_calls_saved + moved.calls_saved[scan_id],
            )
        )


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
