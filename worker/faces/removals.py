"""Embeddings leaving the database, recorded for the indexes built from it.

Whatever takes an embedding out of ``faces`` (a rescan replacing an image's faces, ``faces
erase``, a followed bucket's deletion) records the face's id in ``face_removals`` in the same
transaction; an index (``worker/faces/index.py``) reads the removals it has not seen at every
refresh and drops those vectors from its file. A first scan's write finds no faces to replace and
records nothing.
"""

from __future__ import annotations

from sqlalchemy import literal, select, update

from worker.database import utcnow
from worker.schema import face_removals, faces

#: The PostgreSQL write path's form (worker/outcomes.py), run before it deletes the batch's faces.
POSTGRESQL_RECORD = """
INSERT INTO face_removals (face_id, removed_at)
SELECT id, now() FROM faces WHERE image_id = ANY(%(ids)s) AND embedding IS NOT NULL;
"""


def record(conn, condition) -> None:
    """Record the faces matching ``condition`` that have an embedding, before they or it go."""
    conn.execute(
        face_removals.insert().from_select(
            ["face_id", "removed_at"],
            select(faces.c.id, literal(utcnow(), face_removals.c.removed_at.type)).where(
                condition, faces.c.embedding.is_not(None)
            ),
        )
    )


def forget(conn, condition) -> int:
    """Take the embeddings of the faces matching ``condition`` out (the faces and their names stay);
    the number of embeddings taken."""
    record(conn, condition)
    return conn.execute(
        update(faces)
        .where(condition, faces.c.embedding.is_not(None))
        .values(embedding=None, embedding_model=None, unknown_id=None)
    ).rowcount
