"""Appearances: who is in a video, and when.

Either backend sees people at moments of the video (Rekognition Video's ``{Timestamp, Celebrity}``,
or the local recognizer on sampled frames): :class:`Merger` folds those detections into one
:class:`Appearance` per person (name and id): the time ranges they are seen in (two sightings at
most ``gap`` apart are one range), their best match confidence, and the frame of that best match
with the face's box. Its state is plain JSON, so a local video worked across runs carries it from
one to the next. The appearances of a written video are its rows in ``appearances``; the videos
each person is in are counted per scan in ``person_videos``, by the write that stores them (as
``worker/person_counts.py`` counts images).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, delete, func, select

from worker.recognition import BoundingBox
from worker.schema import appearances, images, person_videos

_NO_ID = ""


@dataclass(frozen=True)
class Appearance:
    """One person in one video."""

    name: str
    person_id: str | None
    match_confidence: float  # the best of their detections
    ranges: tuple[tuple[int, int], ...]  # (start, end) in milliseconds from the video's start
    detections: int
    frame_ms: int  # the moment of the best detection: the representative frame
    box: BoundingBox  # the face in that frame
    urls: tuple[str, ...] = ()
    known_gender: str | None = None

    @property
    def seconds_seen(self) -> float:
        return sum(end - start for start, end in self.ranges) / 1000

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.person_id,
            "confidence": self.match_confidence,
            "ranges": [list(r) for r in self.ranges],
            "detections": self.detections,
            "frame_ms": self.frame_ms,
            "box": [self.box.left, self.box.top, self.box.width, self.box.height],
            "urls": list(self.urls),
            "gender": self.known_gender,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Appearance:
        return cls(
            name=data["name"],
            person_id=data.get("id"),
            match_confidence=float(data["confidence"]),
            ranges=tuple((int(start), int(end)) for start, end in data["ranges"]),
            detections=int(data["detections"]),
            frame_ms=int(data["frame_ms"]),
            box=BoundingBox(*data["box"]),
            urls=tuple(data.get("urls") or ()),
            known_gender=data.get("gender"),
        )


class Merger:
    """Detections in, appearances out; in any order, in pieces (``state`` carries it across runs)."""

    def __init__(self, gap_ms: int, state: Sequence[Mapping[str, Any]] = ()) -> None:
        self.gap_ms = gap_ms
        self._people: dict[tuple[str, str], dict[str, Any]] = {}
        for data in state:
            person = Appearance.from_json(data).to_json()
            self._people[(person["name"], person["id"] or _NO_ID)] = person

    def add(
        self,
        timestamp_ms: int,
        name: str,
        person_id: str | None,
        confidence: float,
        box: BoundingBox,
        urls: Sequence[str] = (),
        known_gender: str | None = None,
    ) -> None:
        key = (name, person_id or _NO_ID)
        person = self._people.get(key)
        if person is None:
            person = self._people[key] = Appearance(
                name, person_id, confidence, (), 0, timestamp_ms, box, tuple(urls), known_gender
            ).to_json()
        person["ranges"] = _merged(person["ranges"], timestamp_ms, self.gap_ms)
        person["detections"] += 1
        if confidence > person["confidence"] or person["detections"] == 1:
            person["confidence"], person["frame_ms"] = confidence, timestamp_ms
            person["box"] = [box.left, box.top, box.width, box.height]

    def state(self) -> list[dict[str, Any]]:
        return list(self._people.values())

    def appearances(self) -> tuple[Appearance, ...]:
        """Everyone seen, in the order they first appear."""
        found = [Appearance.from_json(person) for person in self._people.values()]
        return tuple(sorted(found, key=lambda a: (a.ranges[0][0], a.name, a.person_id or _NO_ID)))


def _merged(ranges: list[list[int]], moment: int, gap_ms: int) -> list[list[int]]:
    """``ranges`` (sorted, apart by more than ``gap_ms``) with ``moment`` added."""
    starts = [start for start, _ in ranges]
    at = bisect.bisect_right(starts, moment)
    new = [moment, moment]
    if at and ranges[at - 1][1] + gap_ms >= moment:  # joins the range before
        at -= 1
        new = [ranges[at][0], max(ranges[at][1], moment)]
        del ranges[at]
    while at < len(ranges) and ranges[at][0] - gap_ms <= new[1]:  # and those after that it reaches
        new = [new[0], max(new[1], ranges[at][1])]
        del ranges[at]
    ranges.insert(at, new)
    return ranges


# -- rows and counts ---------------------------------------------------------------------------------


def rows(image_id: int, found: Iterable[Appearance]) -> list[dict[str, Any]]:
    return [
        dict(
            image_id=image_id,
            appearance_index=index,
            name=a.name,
            person_id=a.person_id,
            match_confidence=a.match_confidence,
            ranges=[list(r) for r in a.ranges],
            detections=a.detections,
            frame_ms=a.frame_ms,
            box_left=a.box.left,
            box_top=a.box.top,
            box_width=a.box.width,
            box_height=a.box.height,
            urls=list(a.urls),
            known_gender=a.known_gender,
        )
        for index, a in enumerate(found)
    ]


def from_row(row) -> Appearance:
    return Appearance(
        name=row.name,
        person_id=row.person_id,
        match_confidence=row.match_confidence,
        ranges=tuple((int(start), int(end)) for start, end in row.ranges),
        detections=row.detections,
        frame_ms=row.frame_ms,
        box=BoundingBox(row.box_left, row.box_top, row.box_width, row.box_height),
        urls=tuple(row.urls or ()),
        known_gender=row.known_gender,
    )


def replace(conn, written: Mapping[int, Sequence[Appearance]]) -> None:
    """The appearances of the videos written (by image id), in place of those they had; the people
    counts follow in the same transaction."""
    if not written:
        return
    ids = sorted(written)
    subtract(conn, ids)
    conn.execute(delete(appearances).where(appearances.c.image_id.in_(ids)))
    new_rows = [row for image_id in ids for row in rows(image_id, written[image_id])]
    if new_rows:
        conn.execute(appearances.insert(), new_rows)
    add(conn, ids)


def counts_query(image_ids: Sequence[int], *, deleted_too: bool = False) -> Select:
    """(scan, name, id, videos) of the appearances of these videos, in lock order."""
    person = func.coalesce(appearances.c.person_id, _NO_ID)
    query = (
        select(images.c.scan_id, appearances.c.name, person, func.count(func.distinct(appearances.c.image_id)))
        .join(images, images.c.id == appearances.c.image_id)
        .where(appearances.c.image_id.in_(list(image_ids)))
        .group_by(images.c.scan_id, appearances.c.name, person)
        .order_by(images.c.scan_id, appearances.c.name, person)
    )
    return query if deleted_too else query.where(images.c.deleted_at.is_(None))


def subtract(conn, image_ids: Sequence[int], *, deleted_too: bool = False) -> None:
    """Take these videos' current appearances out of the counts (before they are replaced or moved)."""
    from worker.person_counts import take_out  # here: person_counts counts videos through this module

    take_out(conn, person_videos, "videos", conn.execute(counts_query(image_ids, deleted_too=deleted_too)).all())


def add(conn, image_ids: Sequence[int]) -> None:
    """Count these videos' current appearances (after they were written or moved)."""
    from worker.person_counts import put_in

    put_in(conn, person_videos, "videos", conn.execute(counts_query(image_ids)).all())
