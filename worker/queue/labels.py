"""A stored face's label and its unknown group, and every transition of them.

    named by the recognizer (Rekognition's celebrity) ── never changed by the gallery
    unknown ──label P──▶ gallery P ──label Q (Q nearer, enrolled later)──▶ gallery Q
       ▲ │                  │
       │ │                  └──unlabel (P removed, or past the threshold now)──▶ unknown
       │ └──group G──▶ grouped G ──merge G into H──▶ grouped H
       │                  ├──take out──▶ kept out (never grouped again)
       │                  └──name G "P" / label P──▶ gallery P
       └── (a face's embedding erased: it leaves its group)

``faces.labelled_by`` is ``'gallery'`` for a name the gallery gave (at scan time by the local
recognizer, or here); ``faces.unknown_id`` is the group (0: kept out). Every transition is one
guarded statement per face or group: it names the state it leaves (the name as read, the group),
so a face that changed meanwhile (rewritten by a rescan, relabelled by another command) is left as
it is, and running a labelling twice changes nothing the second time. A change of names takes the
images' faces out of the kept person counts and puts them back in the same transaction
(``worker/person_counts.py``); on PostgreSQL the images are locked first, in id order, as a
batch's write locks them, so the two never wait on each other crosswise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, Integer, bindparam, or_, select, text, update

from worker import person_counts
from worker.database import utcnow
from worker.retry import retry_database
from worker.schema import GALLERY, faces, images, unknown_people

CHUNK = 2000
KEPT_OUT = 0


@dataclass(frozen=True)
class Relabel:
    """One face's label, from what it was when read to what it becomes (``name`` None: unknown)."""

    face_id: int
    image_id: int
    was: str | None
    name: str | None = None
    person_id: str | None = None
    confidence: float | None = None


#: Faces whose name the gallery may change: unnamed, or named by the gallery.
GALLERY_MAY_CHANGE = or_(faces.c.labelled_by == GALLERY, faces.c.name.is_(None))


class FaceLabels:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def relabel(self, changes: Sequence[Relabel]) -> int:
        """unknown ⇄ gallery P ⇄ gallery Q, each guarded by the name as read; the faces changed
        (a face changed meanwhile by another command or a rescan is left as it is)."""
        return sum(self._relabel(changes[start : start + CHUNK]) for start in range(0, len(changes), CHUNK))

    @retry_database
    def _relabel(self, changes: Sequence[Relabel]) -> int:
        if not changes:
            return 0
        image_ids = sorted({change.image_id for change in changes})
        with self.engine.begin() as conn:
            _lock_images(conn, image_ids)
            person_counts.subtract(conn, image_ids)
            if conn.dialect.name == "postgresql":  # one statement, not one per face
                conn.execute(_POSTGRESQL_RELABEL, _as_arrays(changes))
            else:
                _relabel_portable(conn, changes)
            changed = conn.execute(_changed_count(changes)).scalar_one()
            person_counts.add(conn, image_ids)
        return int(changed)

    # -- unknown groups ----------------------------------------------------------------------------

    def new_groups(self, conn, model: str, count: int) -> list[int]:
        """``count`` new unnamed people, their ids in order."""
        if not count:
            return []
        rows = conn.execute(
            unknown_people.insert().returning(unknown_people.c.id, sort_by_parameter_order=True),
            [dict(embedding_model=model, created_at=utcnow()) for _ in range(count)],
        )
        return [row.id for row in rows]

    def group(self, conn, placed: Sequence[tuple[int, int]]) -> int:
        """unknown → grouped G for each (face, G), of faces still unnamed and ungrouped."""
        if not placed:
            return 0
        if conn.dialect.name == "postgresql":  # one statement: 50,000 single-row UPDATEs took minutes
            conn.execute(
                text(
                    "UPDATE faces SET unknown_id = p.g FROM unnest(CAST(:ids AS integer[]), CAST(:groups AS integer[]))"
                    " AS p(id, g) WHERE faces.id = p.id AND faces.name IS NULL AND faces.unknown_id IS NULL"
                ),
                {"ids": [face_id for face_id, _ in placed], "groups": [group for _, group in placed]},
            )
            return len(placed)
        conn.execute(
            update(faces)
            .where(faces.c.id == bindparam("b_id"), faces.c.name.is_(None), faces.c.unknown_id.is_(None))
            .values(unknown_id=bindparam("b_group", type_=Integer)),
            [dict(b_id=face_id, b_group=group) for face_id, group in placed],
        )
        return len(placed)

    @retry_database
    def merge(self, source: int, into: int) -> int:
        """grouped G → grouped H for every face of G; G is kept as merged into H."""
        with self.engine.begin() as conn:
            moved = conn.execute(update(faces).where(faces.c.unknown_id == source).values(unknown_id=into)).rowcount
            conn.execute(
                update(unknown_people)
                .where(unknown_people.c.id == source, unknown_people.c.merged_into.is_(None))
                .values(merged_into=into)
            )
        return moved

    @retry_database
    def take_out(self, face_ids: Sequence[int]) -> int:
        """grouped → kept out: a face placed in the wrong group, never grouped again."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(faces)
                .where(faces.c.id.in_(list(face_ids)), faces.c.unknown_id > KEPT_OUT)
                .values(unknown_id=KEPT_OUT)
            ).rowcount

    @retry_database
    def name_group(self, group_id: int, name: str, person_id: str) -> int:
        """grouped G → gallery P for every unnamed face of G (G enrolled as P by the caller)."""
        with self.engine.begin() as conn:
            image_ids = sorted(
                conn.execute(select(faces.c.image_id).where(faces.c.unknown_id == group_id).distinct()).scalars()
            )
            _lock_images(conn, image_ids)
            person_counts.subtract(conn, image_ids)
            named = conn.execute(
                update(faces)
                .where(faces.c.unknown_id == group_id, faces.c.name.is_(None))
                .values(name=name, person_id=person_id, match_confidence=None, labelled_by=GALLERY, unknown_id=None)
            ).rowcount
            person_counts.add(conn, image_ids)
            conn.execute(update(unknown_people).where(unknown_people.c.id == group_id).values(named=name))
        return named


def _relabel_portable(conn, changes: Sequence[Relabel]) -> None:
    conn.execute(
        update(faces)
        .where(
            faces.c.id == bindparam("b_id"),
            GALLERY_MAY_CHANGE,
            faces.c.name.is_not_distinct_from(bindparam("b_was")),
        )
        .values(
            name=bindparam("b_name"),
            person_id=bindparam("b_person"),
            match_confidence=bindparam("b_confidence"),
            labelled_by=bindparam("b_by"),
            unknown_id=None,
        ),
        [
            dict(b_id=c.face_id, b_was=c.was, b_name=c.name, b_person=c.person_id, b_confidence=c.confidence, b_by=by)
            for c, by in zip(changes, _named_by(changes), strict=True)
        ],
    )


def _named_by(changes: Sequence[Relabel]) -> list[str | None]:
    return [GALLERY if c.name is not None else None for c in changes]


def _as_arrays(changes: Sequence[Relabel]) -> dict[str, list]:
    return {
        "ids": [c.face_id for c in changes],
        "was": [c.was for c in changes],
        "names": [c.name for c in changes],
        "persons": [c.person_id for c in changes],
        "confidences": [c.confidence for c in changes],
        "bys": _named_by(changes),
    }


#: The same guarded transition for a chunk of faces in one statement (PostgreSQL).
_POSTGRESQL_RELABEL = text("""
UPDATE faces SET name = c.name, person_id = c.person, match_confidence = c.confidence, labelled_by = c.named_by,
       unknown_id = NULL
  FROM unnest(CAST(:ids AS integer[]), CAST(:was AS text[]), CAST(:names AS text[]), CAST(:persons AS text[]),
              CAST(:confidences AS double precision[]), CAST(:bys AS text[]))
       AS c(id, was, name, person, confidence, named_by)
 WHERE faces.id = c.id AND (faces.labelled_by = 'gallery' OR faces.name IS NULL)
   AND faces.name IS NOT DISTINCT FROM c.was
""")


def _changed_count(changes: Sequence[Relabel]):
    """How many of the faces now carry the name they were to get (a batched UPDATE's rowcount is
    not reliable on psycopg2's batches)."""
    from sqlalchemy import func, tuple_

    wanted = [(c.face_id, c.name if c.name is not None else "") for c in changes]
    return select(func.count()).where(tuple_(faces.c.id, func.coalesce(faces.c.name, "")).in_(wanted))


def _lock_images(conn, image_ids: Sequence[int]) -> None:
    if conn.dialect.name == "postgresql" and image_ids:
        conn.execute(
            select(images.c.id).where(images.c.id.in_(list(image_ids))).order_by(images.c.id).with_for_update()
        ).all()
