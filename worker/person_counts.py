"""How many images each person was found in, per scan, kept as faces are written.

Counting from the faces table reads every face (1.7 s for 10 million on this project's machine);
``person_images`` holds one row per scan and person instead. Every write that replaces images'
faces first takes their old faces out of the counts, then adds the new ones, in the same
transaction, so a write repeated or redone never counts twice; an image requeued into another scan
(``--force``) takes its counts along. The rows are updated in one order (scan, name, id), so two
writers never wait on each other crosswise. An image of a deleted object (``celebscan follow``)
counts for nobody: the deletion takes its faces out, and no write counts them while it stays deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Select, bindparam, func, select, update

from worker.schema import faces, images, person_images
from worker.sql import dialect_insert
from worker.videos import appearances

_NO_ID = ""


def counts_query(image_ids: Sequence[int], *, deleted_too: bool = False) -> Select:
    """(scan, name, id, images) of the named faces of these images, in lock order (those of
    deleted objects only when ``deleted_too``)."""
    person = func.coalesce(faces.c.person_id, _NO_ID)
    query = (
        select(images.c.scan_id, faces.c.name, person, func.count(func.distinct(faces.c.image_id)))
        .join(images, images.c.id == faces.c.image_id)
        .where(faces.c.image_id.in_(list(image_ids)), faces.c.name.is_not(None))
        .group_by(images.c.scan_id, faces.c.name, person)
        .order_by(images.c.scan_id, faces.c.name, person)
    )
    return query if deleted_too else query.where(images.c.deleted_at.is_(None))


def subtract(conn, image_ids: Sequence[int], *, deleted_too: bool = False, videos: Sequence[int] = ()) -> None:
    """Take these images' current faces out of the counts (before the faces are replaced or moved;
    ``deleted_too``: just after the images were marked deleted, in that transaction); of them, the
    ``videos``' appearances likewise (``worker/videos/appearances.py``: asked only for videos, so
    an image's write runs the statements it always ran)."""
    if videos:
        appearances.subtract(conn, videos, deleted_too=deleted_too)
    take_out(conn, person_images, "images", conn.execute(counts_query(image_ids, deleted_too=deleted_too)).all())


def take_out(conn, table, column: str, rows) -> None:
    """Subtract each (scan, name, id, count) of ``rows`` from ``table``'s ``column`` (a kept count)."""
    if rows:
        conn.execute(
            update(table)
            .where(
                table.c.scan_id == bindparam("b_scan"),
                table.c.name == bindparam("b_name"),
                table.c.person_id == bindparam("b_person"),
            )
            .values({column: table.c[column] - bindparam("b_count")}),
            [dict(b_scan=scan, b_name=name, b_person=person, b_count=count) for scan, name, person, count in rows],
        )


def add(conn, image_ids: Sequence[int], *, videos: Sequence[int] = ()) -> None:
    """Count these images' current faces (after they were written or moved), and the ``videos``' appearances."""
    if videos:
        appearances.add(conn, videos)
    put_in(conn, person_images, "images", conn.execute(counts_query(image_ids)).all())


def put_in(conn, table, column: str, rows) -> None:
    """Add each (scan, name, id, count) of ``rows`` to ``table``'s ``column``, a row made when missing."""
    if rows:
        insert = dialect_insert(conn.engine, table)
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[table.c.scan_id, table.c.name, table.c.person_id],
                set_={column: table.c[column] + insert.excluded[column]},
            ),
            [dict(scan_id=scan, name=name, person_id=person, **{column: count}) for scan, name, person, count in rows],
        )


def backfill(conn) -> None:
    """Count every face already stored (a database made before ``person_images`` existed)."""
    person = func.coalesce(faces.c.person_id, _NO_ID)
    conn.execute(
        person_images.insert().from_select(
            ["scan_id", "name", "person_id", "images"],
            select(images.c.scan_id, faces.c.name, person, func.count(func.distinct(faces.c.image_id)))
            .join(images, images.c.id == faces.c.image_id)
            .where(faces.c.name.is_not(None), images.c.deleted_at.is_(None))
            .group_by(images.c.scan_id, faces.c.name, person),
        )
    )


#: PostgreSQL's write path runs these as SQL in its own messages (see worker/outcomes.py).
POSTGRESQL_SUBTRACT = """
UPDATE person_images p SET images = p.images - o.n
  FROM (SELECT i.scan_id, f.name, coalesce(f.person_id, '') AS person_id, count(DISTINCT f.image_id) AS n
          FROM faces f JOIN images i ON i.id = f.image_id
         WHERE f.image_id = ANY(%(ids)s) AND f.name IS NOT NULL AND i.deleted_at IS NULL
         GROUP BY 1, 2, 3) o
 WHERE p.scan_id = o.scan_id AND p.name = o.name AND p.person_id = o.person_id;
"""
POSTGRESQL_ADD = """
INSERT INTO person_images (scan_id, name, person_id, images)
SELECT i.scan_id, f.name, coalesce(f.person_id, ''), count(DISTINCT f.image_id)
  FROM faces f JOIN images i ON i.id = f.image_id
 WHERE f.image_id = ANY(%(ids)s) AND f.name IS NOT NULL AND i.deleted_at IS NULL
 GROUP BY 1, 2, 3
 ORDER BY 1, 2, 3
ON CONFLICT ON CONSTRAINT pk_person_images DO UPDATE SET images = person_images.images + EXCLUDED.images
"""
