"""A followed object's life as its bucket's events tell it: created (queued for recognition in the
standing scan) or removed (its images marked deleted), the latest event by S3's sequencer winning.

S3 may deliver the events of one key out of order, and SQS at least once. ``object_events`` keeps
the sequencer of the last event applied to each key: an event applies only when its sequencer is
later (one guarded upsert), so a repeat or an older event changes nothing. An applied creation is
recorded as a listing records an object (:meth:`ImageQueue.record`: skipped when done with that
ETag, left to a live holder, taken over otherwise), and clears the deletion of that version if the
same bytes came back; the key's other versions (an overwrite's) are marked deleted, as they are gone
from the bucket. An applied removal marks every version of the key deleted and takes its faces out
of the people counts, in the same transaction. All of one receive is one transaction, committed
before its messages are deleted from the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, exists, false, or_, select, update

from worker import person_counts
from worker.database import utcnow
from worker.faces import removals
from worker.listing import ListedObject
from worker.queue.images import ImageQueue, restore_deleted
from worker.queue.scans import count_handed_over
from worker.schema import CREATED, REMOVED, faces, images, object_events, scans
from worker.sql import dialect_insert

#: Sequencers are compared as text after right-padding to this width (S3 says: pad the shorter).
SEQUENCER_WIDTH = 64


@dataclass(frozen=True)
class ObjectChange:
    """One object event, as the standing scan applies it (``producer/s3_events.py`` reads them)."""

    kind: str  # CREATED or REMOVED
    key: str
    sequencer: str = ""  # S3's, hexadecimal; "" when the sender gave none: it always applies
    etag: str = ""  # created objects only
    size: int = 0


@dataclass(frozen=True)
class Applied:
    """What applying a receive's events did."""

    queued: int = 0  # created objects recorded queued in the standing scan
    skipped: int = 0  # created objects done before with that ETag (or held by a live run elsewhere)
    deleted: int = 0  # image rows marked deleted
    stale: int = 0  # events older than (or the same as) one applied already: nothing changed


def padded(sequencer: str) -> str:
    return sequencer.upper().ljust(SEQUENCER_WIDTH, "0")[:SEQUENCER_WIDTH] if sequencer else ""


def apply_changes(
    conn, queue: ImageQueue, scan_id: int, bucket: str, backend: str, changes: Sequence[ObjectChange]
) -> Applied:
    """Apply one receive's changes of ``bucket``'s objects in the caller's transaction.

    Of several changes of one key in the receive, the latest counts (by sequencer, else the last
    delivered); it applies only when later than what ``object_events`` holds for the key.
    """
    latest: dict[str, ObjectChange] = {}
    for change in changes:
        kept = latest.get(change.key)
        if kept is None or not change.sequencer or padded(change.sequencer) > padded(kept.sequencer):
            latest[change.key] = change
    applied = [change for change in latest.values() if _take(conn, bucket, backend, change)]
    stale = len(changes) - len(applied)
    created = [change for change in applied if change.kind == CREATED]
    removed = [change for change in applied if change.kind == REMOVED]
    deleted = _mark_deleted(conn, bucket, backend, removed) if removed else 0
    queued = skipped = retried = 0
    if created:
        _supersede(conn, bucket, backend, created)
        versions = [(change.key, change.etag) for change in created]
        restore_deleted(conn, bucket, versions, unless=_overtaken_elsewhere(bucket, backend, created))
        listed = [ListedObject(change.key, change.etag, change.size) for change in created]
        recorded = queue.record(conn, scan_id, bucket, backend, listed, force=False, from_events=True)
        count_handed_over(conn, recorded.moved)
        skipped = recorded.skipped + recorded.held_elsewhere
        queued = len(created) - skipped - recorded.already
        retried = recorded.own_failures_retried  # queued afresh, already counted as listed
    conn.execute(
        update(scans)
        .where(scans.c.id == scan_id)
        .values(
            # What the events brought, once: an object that failed here and came back is still one row.
            listed=scans.c.listed + queued + skipped,
            skipped=scans.c.skipped + skipped,
            events=scans.c.events + len(applied),
            deletions=scans.c.deletions + len(removed),
        )
    )
    return Applied(queued + retried, skipped, deleted, stale)


def _take(conn, bucket: str, backend: str, change: ObjectChange) -> bool:
    """Record ``change`` as the key's latest event, if it is later than the one recorded (one
    statement: two followers applying events of one key never both win)."""
    insert = dialect_insert(conn.engine, object_events)
    sequencer = padded(change.sequencer)
    etag = change.etag if change.kind == CREATED else None
    statement = insert.values(
        bucket=bucket,
        key=change.key,
        backend=backend,
        sequencer=sequencer,
        kind=change.kind,
        etag=etag,
        applied_at=utcnow(),
    ).on_conflict_do_update(
        index_elements=[object_events.c.bucket, object_events.c.key, object_events.c.backend],
        set_={
            "sequencer": insert.excluded.sequencer,
            "kind": insert.excluded.kind,
            "etag": insert.excluded.etag,
            "applied_at": utcnow(),
        },
        where=or_(insert.excluded.sequencer == "", object_events.c.sequencer < insert.excluded.sequencer),
    )
    return bool(conn.execute(statement).rowcount)


def _mark_deleted(conn, bucket: str, backend: str, removed: Sequence[ObjectChange]) -> int:
    """A removal: every version of these keys marked deleted."""
    keys = images.c.key.in_([change.key for change in removed])
    return _mark(conn, bucket, and_(keys, ~_overtaken_elsewhere(bucket, backend, removed)))


def _supersede(conn, bucket: str, backend: str, created: Sequence[ObjectChange]) -> int:
    """An overwrite: the key's other versions are gone from the bucket, marked deleted like a
    removal's, so people count each object once, as it is now."""
    versions = or_(*(and_(images.c.key == c.key, images.c.etag != c.etag) for c in created))
    return _mark(conn, bucket, and_(versions, ~_overtaken_elsewhere(bucket, backend, created)))


def _overtaken_elsewhere(bucket: str, backend: str, changes: Sequence[ObjectChange]):
    """An image row of another backend whose own follower applied a later event of its key than
    ``changes`` hold: a removal or creation that this follower applies late says nothing of it (with
    one queue per backend, each follower is behind or ahead on its own). A condition on ``images``."""
    later = [
        and_(object_events.c.key == change.key, object_events.c.sequencer > padded(change.sequencer))
        for change in changes
        if change.sequencer
    ]
    if not later:
        return false()
    return exists(
        select(object_events.c.key).where(
            object_events.c.bucket == bucket,
            object_events.c.key == images.c.key,
            object_events.c.backend == images.c.backend,
            object_events.c.backend != backend,
            or_(*later),
        )
    )


def _mark(conn, bucket: str, versions) -> int:
    """The bucket's image rows of ``versions`` marked deleted, and their faces taken out of the counts.

    The rows are updated first: on PostgreSQL that waits for a write of them in flight, so the
    faces taken out are the ones that write left."""
    rows = conn.execute(
        update(images)
        .where(images.c.bucket == bucket, versions, images.c.deleted_at.is_(None))
        .values(deleted_at=utcnow())
        .returning(images.c.id, images.c.media)
    ).all()
    marked = [row.id for row in rows]
    if marked:
        person_counts.subtract(conn, marked, deleted_too=True, videos=[row.id for row in rows if row.media == "video"])
        removals.forget(conn, faces.c.image_id.in_(marked))  # gone with its picture
    return len(marked)
