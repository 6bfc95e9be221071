"""The read side's queries: who was found where (result records, and the people found with the
images and videos they are in); what they return is ``worker/read_models.py``.

Both read by index at any size: records stream in chunks of image ids (constant memory), a
person's images are found through ``ix_faces_name`` / ``ix_faces_person_id`` (the name or the
Rekognition id, then the image id), so asking for one person among millions of faces reads only
that person's entries, and everyone's counts are kept per scan as faces are written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import BigInteger, Engine, Select, and_, exists, func, literal, select, union, union_all

from worker.database import CHUNK_SIZE
from worker.media.video import VIDEO
from worker.read_models import ResultRecord, result_record
from worker.schema import appearances, faces, images, person_images, person_videos, scans


@dataclass(frozen=True)
class PersonFound:
    """A person found, as the recognizer named them, and the number of images and videos they are in."""

    name: str
    person_id: str | None  # Rekognition's celebrity id (two people with one name stay apart)
    images: int
    videos: int = 0


def people_found(
    engine: Engine, scan_id: int | None = None, limit: int | None = None, include_deleted: bool = False
) -> list[PersonFound]:
    """Everyone found (in one scan, or in every result kept), most images first.

    Read from the counts kept as faces are written (``worker/person_counts.py``): a row per scan
    and person. Without a scan every image row counts, so an older version of a changed file
    counts too (until it is scanned again, a file has one row). Images of deleted objects (a
    followed bucket's) count only with ``include_deleted``, read from their faces (they are few).
    """
    with engine.connect() as conn:
        rows = conn.execute(people_query(scan_id, limit, include_deleted))
        return [
            PersonFound(name, person_id or None, int(pictures), int(videos))
            for name, person_id, pictures, videos in rows
        ]


def people_query(scan_id: int | None = None, limit: int | None = None, include_deleted: bool = False) -> Select:
    """(name, Rekognition id or '', images, videos) of everyone found, most images and videos first."""
    nothing = literal(0, BigInteger)
    counted = [
        select(person_images.c.name, person_images.c.person_id, person_images.c.images, nothing.label("videos")),
        select(person_videos.c.name, person_videos.c.person_id, nothing.label("images"), person_videos.c.videos),
    ]
    if scan_id is not None:
        counted = [
            counted[0].where(person_images.c.scan_id == scan_id),
            counted[1].where(person_videos.c.scan_id == scan_id),
        ]
    if include_deleted:
        counted += [_deleted_counts(scan_id, faces), _deleted_counts(scan_id, appearances)]
    rows = union_all(*counted).subquery()
    images_in, videos_in = func.sum(rows.c.images), func.sum(rows.c.videos)
    query = (
        select(rows.c.name, rows.c.person_id, images_in.label("images"), videos_in.label("videos"))
        .group_by(rows.c.name, rows.c.person_id)
        .having(images_in + videos_in > 0)
        .order_by((images_in + videos_in).desc(), rows.c.name, rows.c.person_id)
    )
    return query.limit(limit) if limit is not None else query


def _deleted_counts(scan_id: int | None, found) -> Select:
    """(name, id, images, videos) of the people in images (``found``: faces) or videos
    (appearances) of deleted objects, which the kept counts leave out."""
    person = func.coalesce(found.c.person_id, "")
    count = func.count(func.distinct(found.c.image_id))
    nothing = literal(0, BigInteger)
    pictures, videos = (count, nothing) if found is faces else (nothing, count)
    query = (
        select(found.c.name, person.label("person_id"), pictures.label("images"), videos.label("videos"))
        .join(images, images.c.id == found.c.image_id)
        .where(images.c.deleted_at.is_not(None), found.c.name.is_not(None))
        .group_by(found.c.name, person)
    )
    return query.where(images.c.scan_id == scan_id) if scan_id is not None else query


def result_records(
    engine: Engine,
    scan_id: int | None = None,
    key: str | None = None,
    persons: Sequence[str] = (),
    limit: int | None = None,
    include_deleted: bool = False,
) -> Iterator[ResultRecord]:
    """One record per image, in the result format of docs/guide.md, streamed in chunks of image ids.

    With no scan, every image's latest version (an object whose content changed has one row per
    etag; only the newest is reported). With ``key``, only images of that key; with ``persons``
    (names or Rekognition ids), only images in which one of them was found; ``limit`` stops after
    that many records. Images of deleted objects (a followed bucket's) only with ``include_deleted``.
    """
    query = select(images, scans.c.source).join(scans, images.c.scan_id == scans.c.id).order_by(images.c.id)
    if not include_deleted:
        query = query.where(images.c.deleted_at.is_(None))
    if key is not None:
        query = query.where(images.c.key == key)
    if scan_id is not None:
        query = query.where(images.c.scan_id == scan_id)
    else:
        newer = images.alias("newer")
        newer_version = exists().where(
            newer.c.bucket == images.c.bucket,
            newer.c.key == images.c.key,
            newer.c.backend == images.c.backend,
            newer.c.id > images.c.id,
        )
        if not include_deleted:  # a deleted newer version hides nothing: the object may be back as it was
            newer_version = newer_version.where(newer.c.deleted_at.is_(None))
        query = query.where(~newer_version)
    left = limit
    last_id = 0
    if persons:
        with engine.connect() as conn:
            ranges = person_ranges(conn, persons)
    while left is None or left > 0:
        with engine.connect() as conn:
            if persons:
                ids = _image_ids_with(conn, ranges, last_id, persons)
                if not ids:
                    return
                rows = conn.execute(query.where(images.c.id.in_(ids))).all()
                last_id = ids[-1]
            else:
                rows = conn.execute(query.where(images.c.id > last_id).limit(CHUNK_SIZE)).all()
                if not rows:
                    return
                last_id = rows[-1].id
            rows = rows[:left] if left is not None else rows
            faces_by_image: dict[int, list] = {}
            appearances_by_video: dict[int, list] = {}
            if rows:
                for face in conn.execute(
                    select(faces).where(faces.c.image_id.in_([r.id for r in rows])).order_by(faces.c.face_index)
                ):
                    faces_by_image.setdefault(face.image_id, []).append(face)
                videos = [r.id for r in rows if r.media == VIDEO]
                if videos:
                    for appearance in conn.execute(
                        select(appearances)
                        .where(appearances.c.image_id.in_(videos))
                        .order_by(appearances.c.appearance_index)
                    ):
                        appearances_by_video.setdefault(appearance.image_id, []).append(appearance)
        for row in rows:
            yield result_record(row, faces_by_image.get(row.id, []), appearances_by_video.get(row.id, []))
        if left is not None:
            left -= len(rows)


def person_ranges(conn, persons: Sequence[str]) -> list:
    """One condition per index range holding a person's faces: (name, Rekognition id) for each id
    found under a name (each found with one index probe, not by reading the person's entries),
    and the id itself for a person given by id."""
    ranges = []
    for person in dict.fromkeys(persons):
        ranges.append(faces.c.person_id == person)
        last = None
        while True:  # the ids found under this name, one probe each
            query = select(faces.c.person_id).where(faces.c.name == person, faces.c.person_id.is_not(None))
            if last is not None:
                query = query.where(faces.c.person_id > last)
            last = conn.execute(query.order_by(faces.c.person_id).limit(1)).scalar()
            if last is None:
                break
            ranges.append(and_(faces.c.name == person, faces.c.person_id == last))
        ranges.append(and_(faces.c.name == person, faces.c.person_id.is_(None)))
    return ranges


def _image_ids_with(conn, ranges: list, after: int, persons: Sequence[str] = ()) -> list[int]:
    """The next chunk of ids of images with one of the people (by their faces' ranges) and of
    videos with one of them (by name or id)."""
    found = set(conn.execute(next_ids_query(ranges, after)).scalars())
    if persons:
        found |= set(conn.execute(next_video_ids_query(persons, after)).scalars())
    return sorted(found)[:CHUNK_SIZE]


def next_video_ids_query(persons: Sequence[str], after: int) -> Select:
    """The next chunk of ids of videos (after ``after``) in which one of ``persons`` (names or
    Rekognition ids) appears, through ``ix_appearances_name`` and ``ix_appearances_person_id``."""
    conditions = [appearances.c.name.in_(list(persons)), appearances.c.person_id.in_(list(persons))]
    return _next_ids(appearances.c.image_id, conditions, after)


def next_ids_query(ranges: list, after: int) -> Select:
    """The next chunk of image ids (after ``after``, ascending) in any of the ranges: each range
    reads at most a chunk of its index, whatever the person's number of images."""
    return _next_ids(faces.c.image_id, ranges, after)


def _next_ids(image_id, conditions: list, after: int) -> Select:
    """The next chunk of ``image_id`` values after ``after`` meeting any of ``conditions``, each
    read as a chunk of its own index range."""
    parts = [
        select(image_id).where(condition, image_id > after).order_by(image_id).limit(CHUNK_SIZE).subquery().select()
        for condition in conditions
    ]
    merged = union(*parts).subquery()
    return select(merged.c.image_id).order_by(merged.c.image_id).limit(CHUNK_SIZE)
