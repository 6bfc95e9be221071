"""A batch's images in and its results out: what a worker reads of an image, what it found, and
the face rows that hold it.

The write itself, fenced by the run's claim, is an image transition (``worker/queue/images.py``);
this module turns outcomes into face rows and replaces an image's faces in that transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Integer, delete, literal, select

from worker import person_counts
from worker.faces import removals
from worker.recognition import RecognitionResult
from worker.schema import DONE, FAILED, GALLERY, QUEUED, faces
from worker.sql import dialect_insert

if TYPE_CHECKING:
    from worker.videos.appearances import Appearance


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
    started_by: str | None = None  # the run (claim token) that last started it
    retries: int = 0  # tries that ended in a transient error, over every delivery
    retry_since: datetime | None = None  # the first of those; the retry deadline counts from it
    reuse_results: bool = True  # any known picture's result is copied (False: --force, only its own scan's)
    media: str | None = None  # 'video' for a video (worker/videos/), None for an image
    content_hash: str | None = None  # the MD5 of the bytes, once a worker has read them


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
    # What this run spent on the image, added to its totals by the fenced write (which a replay or
    # a late holder cannot repeat): calls a paid recognizer billed, and calls the face prefilter
    # kept from it.
    paid_calls: int = 0
    calls_saved: int = 0
    content_hash: str | None = None  # MD5 of the bytes read (None: not read, or unchanged)
    # A deferred image (status still ``queued``: a transient cause outlasted the in-process
    # retries) gets its delivery count put back, as this delivery did not crash, and its retries
    # (0: a video's step went well, its streak of transient errors ended and ``retry_since`` is cleared).
    attempts: int | None = None
    retries: int | None = None
    retry_since: datetime | None = None
    not_before: datetime | None = None  # a deferred image is not claimed again before this
    # A copy of the known result of image ``copied_from`` (the same picture): with ``result`` None,
    # the write copies that image's faces in the database.
    copied_from: int | None = None
    work_ms: int | None = None  # the worker's time on the image (read, decode, recognize)
    # A video: its appearances (written in place of its faces; None: not a finished video) and length.
    appearances: tuple[Appearance, ...] | None = None
    duration_ms: int | None = None

    @property
    def deferred(self) -> bool:
        return self.status == QUEUED

    def image_values(self) -> dict[str, Any]:
        """The image columns the write sets, by name, for both write paths: None leaves a value as
        it is (``COALESCE`` in the statements), and ``not_before`` is cleared unless the image is
        deferred."""
        return {
            "id": self.image_id,
            "status": self.status,
            "width": self.width,
            "height": self.height,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "paid_calls": self.paid_calls,
            "calls_saved": self.calls_saved,
            "attempts": self.attempts,
            "retries": self.retries,
            "retry_since": self.retry_since,
            "not_before": self.not_before,
            "content_hash": self.content_hash,
            "copied_from": self.copied_from,
            "work_ms": self.work_ms,
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def done(
        cls,
        image_id: int,
        width: int,
        height: int,
        result: RecognitionResult,
        *,
        paid_calls: int = 0,
        calls_saved: int = 0,
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
    def waiting(cls, image: QueuedImage, not_before: datetime, content_hash: str | None = None) -> ImageOutcome:
        """The image is a copy of a picture another holder is recognizing right now: it waits for
        that result (no call, no error), queued again from ``not_before``."""
        return cls(image.id, QUEUED, attempts=image.attempts, not_before=not_before, content_hash=content_hash)

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


def _as_of_image(outcome: ImageOutcome) -> dict[str, Any]:
    return outcome.image_values()


def replace_faces_portable(conn, outcomes: Sequence[ImageOutcome]) -> None:
    """Replace the faces of the images written (SQLAlchemy Core: any dialect; SQLite), their
    person counts taken out and put back in the same transaction."""
    ids = [o.image_id for o in outcomes]
    person_counts.subtract(conn, ids)
    removals.record(conn, faces.c.image_id.in_(ids))
    conn.execute(delete(faces).where(faces.c.image_id.in_(ids)))
    rows = [row for o in outcomes if o.result for row in face_row_dicts(o.image_id, o.result)]
    if rows:
        conn.execute(dialect_insert(conn.engine, faces).on_conflict_do_nothing(), rows)  # (image, index)


def copy_faces_portable(conn, outcomes: Sequence[ImageOutcome]) -> None:
    """The faces of copied pictures, copied from the images they copy; then the images' counts."""
    for outcome in outcomes:
        if outcome.copied_from is not None and outcome.result is None:
            conn.execute(_copy_faces(outcome.image_id, outcome.copied_from))
    person_counts.add(conn, [o.image_id for o in outcomes])


def stream_faces_postgresql(cursor, outcomes: Sequence[ImageOutcome]) -> None:
    """Replace the faces of the images written, on the transaction's own psycopg2 cursor: the
    old faces taken out of the person counts and deleted, copied pictures' faces copied, then the
    new faces ``COPY``-ed in (streamed as COPY text, made while the server inserts the rows already
    sent, so its work and ours overlap), then counted."""
    parameters = {
        "ids": [o.image_id for o in outcomes],
        "copies": orjson.dumps(
            [{"id": o.image_id, "source": o.copied_from} for o in outcomes if o.copied_from and o.result is None]
        ).decode(),
    }
    copy_text = _CopyText(values for o in outcomes if o.result for values in face_values(o.image_id, o.result))
    try:
        cursor.copy_expert(cursor.mogrify(_POSTGRESQL_REPLACE_FACES, parameters).decode(), copy_text, size=_COPY_CHUNK)
    except Exception:
        if copy_text.error is not None:  # psycopg2 reports it as a cancelled query, which would be retried
            raise copy_text.error from None
        raise
    cursor.execute(person_counts.POSTGRESQL_ADD, parameters)


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


def _copy_bytes(value: bytes | None) -> str:
    """bytea in COPY text: hex, its backslash doubled."""
    return "\\N" if value is None else "\\\\x" + value.hex()


def _copy_line(values: tuple) -> str:
    """One face row (``_FACE_COLUMNS`` order) as a COPY text line; written out for speed."""
    (
        image_id,
        index,
        name,
        person_id,
        match,
        confidence,
        left,
        top,
        width,
        height,
        urls,
        gender,
        landmarks,
        details,
        embedding,
        model,
        labelled_by,
    ) = values
    return (
        f"{image_id}\t{index}\t{_copy_text(name)}\t{_copy_text(person_id)}\t{_copy_number(match)}\t"
        f"{_copy_number(confidence)}\t{left!r}\t{top!r}\t{width!r}\t{height!r}\t{_copy_json(urls)}\t"
        f"{_copy_text(gender)}\t{_copy_json(landmarks)}\t{_copy_json(details)}\t{_copy_bytes(embedding)}\t"
        f"{_copy_text(model)}\t{_copy_text(labelled_by)}\n"
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
    "embedding",
    "embedding_model",
    "labelled_by",
)

#: One message: the batch's old faces taken out of the person counts and deleted, those of copied
#: pictures copied from the images they copy, then COPY, which ends it and waits for the face rows;
#: the new faces are counted after it (``person_counts.POSTGRESQL_ADD``).
_POSTGRESQL_REPLACE_FACES = f"""
{person_counts.POSTGRESQL_SUBTRACT}
{removals.POSTGRESQL_RECORD}
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
    model = result.embedding_model
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
                celebrity.embedding,
                model if celebrity.embedding is not None else None,
                GALLERY if celebrity.from_gallery else None,
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
                face.embedding,
                model if face.embedding is not None else None,
                None,
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
