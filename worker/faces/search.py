"""Finding a face anywhere: every picture whose stored faces are within the threshold of one face
of a photo, nearest first, read from the face index and checked against the database (a face
rescanned, erased or deleted since the index's refresh is not reported)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, select

from worker.errors import CelebscanError
from worker.faces.embeddings import DetectedFace, FaceEmbedder
from worker.faces.index import FaceIndex
from worker.faces.models import EmbeddingModel
from worker.media.images import ImageLimits, decode_image
from worker.recognition import BoundingBox
from worker.recognizers.local import match_confidence
from worker.schema import faces, images, scans
from worker.sources import Source

CHUNK = 1000


class FindError(CelebscanError):
    code = "FindError"


@dataclass(frozen=True)
class Sighting:
    """A picture the face is in: where, which of its faces, how near, and who it is said to be."""

    source: str
    key: str
    image_id: int
    face_id: int
    distance: float
    confidence: float
    bounding_box: BoundingBox
    name: str | None
    unknown_id: int | None

    @property
    def location(self) -> str:
        kind = Source.from_url(self.source)
        return f"s3://{kind.bucket}/{self.key}" if kind.kind == "s3" else f"{kind.bucket}/{self.key}"

    def to_dict(self) -> dict:
        return {
            "location": self.location,
            "key": self.key,
            "image_id": self.image_id,
            "face_id": self.face_id,
            "distance": round(self.distance, 4),
            "confidence": round(self.confidence, 1),
            "bounding_box": self.bounding_box.to_dict(),
            "name": self.name,
            "unknown": self.unknown_id or None,
        }


def faces_in_photo(data: bytes, embedder: FaceEmbedder) -> tuple[list[DetectedFace], int, int]:
    """The faces of a photo, largest first, and its size."""
    image = decode_image(data, ImageLimits(min_side=1))
    found = sorted(embedder.faces(image.pixels), key=lambda face: -_area(face))
    return found, image.width, image.height


def _area(face: DetectedFace) -> float:
    found = face.detection
    return (found.right - found.left) * (found.bottom - found.top)


def pick_face(found: Sequence[DetectedFace], number: int | None) -> DetectedFace:
    """The face to look for: the only one, or the ``number``-th (1 = largest)."""
    if not found:
        raise FindError("no face found in the photo")
    if number is None:
        if len(found) > 1:
            raise FindError(f"{len(found)} faces in the photo: choose one with --face 1..{len(found)} (1 = largest)")
        return found[0]
    if not 1 <= number <= len(found):
        raise FindError(f"--face {number}: the photo has {len(found)} face{'s' if len(found) != 1 else ''}")
    return found[number - 1]


def find(
    engine: Engine, index: FaceIndex, model: EmbeddingModel, embedding: np.ndarray, limit: int | None = None
) -> list[Sighting]:
    """Every picture with a face within the threshold of ``embedding``, nearest first (one line per
    picture: its nearest face)."""
    ids, distances = index.within(np.asarray(embedding, dtype=np.float32)[None, :], model.threshold, probes=64)[0]
    order = np.argsort(distances, kind="stable")
    ids, distances = ids[order], distances[order]
    sightings: list[Sighting] = []
    seen: set[int] = set()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        rows = {row.id: row for row in stored_face_rows(engine, chunk.tolist())}
        for face_id, distance in zip(chunk.tolist(), distances[start : start + CHUNK].tolist(), strict=True):
            row = rows.get(face_id)
            if row is None or row.image_id in seen:
                continue
            seen.add(row.image_id)
            sightings.append(
                Sighting(
                    source=row.source,
                    key=row.key,
                    image_id=row.image_id,
                    face_id=face_id,
                    distance=distance,
                    confidence=match_confidence(distance, model.threshold),
                    bounding_box=BoundingBox(row.box_left, row.box_top, row.box_width, row.box_height),
                    name=row.name,
                    unknown_id=row.unknown_id,
                )
            )
            if limit is not None and len(sightings) >= limit:
                return sightings
    return sightings


def stored_face_rows(engine: Engine, face_ids: list[int]):
    """The faces still stored with an embedding, in pictures not deleted."""
    with engine.connect() as conn:
        return conn.execute(
            select(
                faces.c.id,
                faces.c.image_id,
                faces.c.name,
                faces.c.unknown_id,
                faces.c.box_left,
                faces.c.box_top,
                faces.c.box_width,
                faces.c.box_height,
                images.c.key,
                scans.c.source,
            )
            .join(images, images.c.id == faces.c.image_id)
            .join(scans, scans.c.id == images.c.scan_id)
            .where(faces.c.id.in_(face_ids), faces.c.embedding.is_not(None), images.c.deleted_at.is_(None))
        ).all()
