"""A batch's images in and its results out: what a worker reads, and the writes of its outcomes.

Every write is idempotent: a batch's results are written in one transaction that replaces the
batch's faces and sets (never adds to) each image's counts, so a batch written twice doubles nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    DateTime,
    Integer,
    String,
    bindparam,
    delete,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from worker import person_counts
from worker.database import dialect_insert, utcnow
from worker.results import RecognitionResult
from worker.schema import DONE, FAILED, QUEUED, faces, images, scans


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
    reuse_results: bool = True  # a known picture's result is copied (False: the scan ran with --force)


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
    not_before: datetime | None = None  # a deferred image is not claimed again before this
    # A copy of the known result of image ``copied_from`` (the same picture): with ``result`` None,
    # the write copies that image's faces in the database.
    copied_from: int | None = None
    work_ms: int | None = None  # the worker's time on the image (read, decode, recognize)

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
    def copied(
        cls,
        image: QueuedImage,
        known: KnownPicture,
        content_hash: str,
        result: RecognitionResult | None = None,
    ) -> ImageOutcome:
        """The known result of the same picture, copied: no call (``result`` given when the known
        picture was recognized in this batch and is not written yet)."""
        return cls(
            image.id,
            DONE,
            known.width,
            known.height,
            result,
            paid_calls=image.paid_calls,
            content_hash=content_hash,
            copied_from=known.id,
        )

    @classmethod
    def deferred_for(
        cls,
        image: QueuedImage,
        code: str,
        message: str,
        *,
        retries: int,
        retry_since: datetime,
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
            not_before=not_before,
        )

    @classmethod
    def failed(
        cls, image_id: int, code: str, message: str, width: int | None = None, height: int | None = None
    ) -> ImageOutcome:
        return cls(image_id, FAILED, width, height, error_code=code, error_message=message[:2000])


@dataclass(frozen=True)
class KnownPicture:
    """An image already recognized whose bytes are the same as another's."""

    id: int
    width: int | None
    height: int | None


class MissingImagesError(LookupError):
    """Results were handed in for images the store does not have; nothing of the batch was written."""


def _check_all_found(found: int, ids: Sequence[int]) -> None:
    if found != len(ids):
        raise MissingImagesError(
            f"{len(ids) - found} of the batch's {len(ids)} images are not in the images table "
            "(deleted while the batch ran?); nothing of the batch was written"
        )


def _image_values(o: ImageOutcome) -> dict[str, Any]:
    """An outcome's image columns by name, for both write paths: None leaves a count as it is
    (``COALESCE`` in the statements), and ``not_before`` is cleared unless the image is deferred."""
    return {
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
        "copied_from": o.copied_from,
        "work_ms": o.work_ms,
    }


def write_outcomes_portable(conn, outcomes, ids, face_rows, now) -> set[int]:
    """SQLAlchemy Core statements that any dialect runs (SQLite); returns the batch's scan ids."""
    image_updates = [
        {**{f"b_{name}": value for name, value in _image_values(o).items()}, "b_now": None if o.deferred else now}
        for o in outcomes
    ]

    def kept_unless_given(name: str, type_) -> Any:
        return func.coalesce(bindparam(f"b_{name}", type_=type_), images.c[name])

    updated = conn.execute(
        update(images)
        .where(images.c.id == bindparam("b_id"))
        .values(
            status=bindparam("b_status"),
            width=bindparam("b_width"),
            height=bindparam("b_height"),
            error_code=bindparam("b_error_code"),
            error_message=bindparam("b_error_message"),
            processed_at=bindparam("b_now"),
            paid_calls=kept_unless_given("paid_calls", Integer),
            calls_saved=kept_unless_given("calls_saved", Integer),
            attempts=kept_unless_given("attempts", Integer),
            retries=kept_unless_given("retries", Integer),
            retry_since=kept_unless_given("retry_since", DateTime(timezone=True)),
            not_before=bindparam("b_not_before", type_=DateTime(timezone=True)),
            content_hash=kept_unless_given("content_hash", String),
            copied_from=bindparam("b_copied_from", type_=Integer),
            work_ms=bindparam("b_work_ms", type_=Integer),
            claimed_by=None,
        ),
        image_updates,
    )
    _check_all_found(updated.rowcount, ids)
    person_counts.subtract(conn, ids)
    conn.execute(delete(faces).where(faces.c.image_id.in_(ids)))
    if face_rows:
        conn.execute(dialect_insert(conn.engine, faces).on_conflict_do_nothing(), face_rows)  # (image, index)
    for outcome in outcomes:
        if outcome.copied_from is not None and outcome.result is None:
            conn.execute(_copy_faces(outcome.image_id, outcome.copied_from))
    person_counts.add(conn, ids)
    return set(conn.execute(select(images.c.scan_id).where(images.c.id.in_(ids)).distinct()).scalars())


def write_outcomes_postgresql(conn, outcomes, ids, face_tuples, now) -> set[int]:
    """The same writes, inside the caller's transaction (``engine.begin()``, which commits or rolls
    back and drops a broken connection); returns the batch's scan ids.

    1. Update the image rows (the batch travels as one JSON document that PostgreSQL expands with
       ``json_to_recordset``), returning their scans; every image must be found, which is what
       keeps a face from ever pointing at no image (``faces.image_id`` has no foreign key: see
       ``worker/schema.py``).
    2. Delete the batch's faces and ``COPY`` the new ones in, through the connection's own
       psycopg2 cursor: the rows stream as COPY text, made while the server inserts the rows
       already sent, so its work and ours overlap.
    """
    image_rows = [_image_values(o) for o in outcomes]
    copies = [{"id": o.image_id, "source": o.copied_from} for o in outcomes if o.copied_from and o.result is None]
    parameters = {
        "images": orjson.dumps(image_rows).decode(),
        "ids": ids,
        "now": now,
        "copies": orjson.dumps(copies).decode(),
    }
    dbapi_connection = conn.connection.dbapi_connection
    statement, copy_text = _POSTGRESQL_UPDATE_IMAGES, _CopyText(face_tuples)
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(statement, parameters)
            scan_ids = [scan_id for (scan_id,) in cursor.fetchall()]
            _check_all_found(len(scan_ids), ids)
            statement = _POSTGRESQL_REPLACE_FACES
            cursor.copy_expert(cursor.mogrify(statement, parameters).decode(), copy_text, size=_COPY_CHUNK)
            statement = person_counts.POSTGRESQL_ADD
            cursor.execute(statement, parameters)
        return set(scan_ids)
    except dbapi_connection.Error as exc:
        if copy_text.error is not None:  # psycopg2 reports it as a cancelled query, which would be retried
            raise copy_text.error from None
        # As SQLAlchemy reports it (what the retries catch); a lost connection is dropped from the pool.
        disconnected = conn.dialect.is_disconnect(exc, dbapi_connection, None)
        if disconnected:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, dbapi_connection.Error, connection_invalidated=disconnected, dialect=conn.dialect
        ) from exc


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


def finish_scans_if_drained(conn, scan_ids: Iterable[int]) -> None:
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

#: A batch touches its own rows by key, where a sequential scan is never right; without statistics
#: (a young table, before autovacuum's first ANALYZE) the planner picks one anyway: over 15,000
#: faces that was 4 ms a batch. ``SET LOCAL`` lasts until the transaction ends.
_POSTGRESQL_UPDATE_IMAGES = """
SET LOCAL enable_seqscan = off;
UPDATE images SET status = u.status, width = u.width, height = u.height, error_code = u.error_code,
       error_message = u.error_message, processed_at = CASE WHEN u.status = 'queued' THEN NULL ELSE %(now)s END,
       paid_calls = COALESCE(u.paid_calls, images.paid_calls),
       calls_saved = COALESCE(u.calls_saved, images.calls_saved),
       attempts = COALESCE(u.attempts, images.attempts), retries = COALESCE(u.retries, images.retries),
       retry_since = COALESCE(u.retry_since, images.retry_since), not_before = u.not_before, claimed_by = NULL,
       content_hash = COALESCE(u.content_hash, images.content_hash), copied_from = u.copied_from,
       work_ms = u.work_ms
  FROM json_to_recordset(%(images)s::json)
       AS u(id integer, status text, width integer, height integer, error_code text, error_message text,
            paid_calls integer, calls_saved integer, attempts integer, retries integer, retry_since timestamptz,
            not_before timestamptz, content_hash text, copied_from integer, work_ms integer)
 WHERE images.id = u.id AND images.id = ANY(%(ids)s)
RETURNING images.scan_id
"""

#: One message: the batch's old faces taken out of the person counts and deleted, those of copied
#: pictures copied from the images they copy, then COPY, which ends it and waits for the face rows;
#: the new faces are counted after it (``person_counts.POSTGRESQL_ADD``).
_POSTGRESQL_REPLACE_FACES = f"""
{person_counts.POSTGRESQL_SUBTRACT}
DELETE FROM faces WHERE image_id = ANY(%(ids)s);
INSERT INTO faces ({", ".join(_FACE_COLUMNS)})
SELECT c.id, {", ".join("f." + column for column in _FACE_COLUMNS[1:])}
  FROM json_to_recordset(%(copies)s::json) AS c(id integer, source integer) JOIN faces f ON f.image_id = c.source;
COPY faces ({", ".join(_FACE_COLUMNS)}) FROM STDIN
"""


def _copy_faces(image_id: int, source_id: int):
    """The faces of image ``source_id``, inserted as image ``image_id``'s (a copied picture)."""
    columns = [faces.c[column] for column in _FACE_COLUMNS[1:]]
    return faces.insert().from_select(
        list(_FACE_COLUMNS),
        select(literal(image_id, Integer), *columns).where(faces.c.image_id == source_id),
    )


def face_values(image_id: int, result: RecognitionResult) -> list[tuple]:
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


def face_row_dicts(image_id: int, result: RecognitionResult) -> list[dict[str, Any]]:
    return [dict(zip(_FACE_COLUMNS, values, strict=True)) for values in face_values(image_id, result)]


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
