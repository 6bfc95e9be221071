"""The local recognizer's known people: enrollment, listing, removal, re-embedding, and the index.

Each enrolled photo must show exactly one face. Its embedding is stored with the id of the model
that made it (:mod:`worker.faces.models`) and with the face's crop (the face and half its size
around it, a small JPEG), which is what a later model re-embeds from: the photo itself may be gone
by then. Enrolling the same photo twice is a no-op (photos are identified by content hash).

The index holds the current model's embeddings only. Photos embedded by another model (a gallery
made before an upgrade) are re-embedded by :meth:`Gallery.reembed` (``celebscan gallery reembed``,
run by ``celebscan scan`` when needed) from their crop, or from the photo at the path it was
enrolled from when its bytes are unchanged; what has neither must be enrolled again, and says so.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Engine, delete, func, select, update

from worker.database import utcnow
from worker.errors import CelebscanError, GalleryError
from worker.faces.detection import grown
from worker.faces.embeddings import DetectedFace, FaceEmbedder
from worker.faces.models import CURRENT, EmbeddingModel
from worker.media.images import ImageLimits, decode_image, is_image_name
from worker.schema import gallery_faces, people
from worker.sql import dialect_insert

log = logging.getLogger(__name__)

#: The kept crop: the face's box grown by this share of its size on every side, at most this many
#: pixels on its longer side (SFace looks at 112 px; a later model is unlikely to need more than 2x).
CROP_MARGIN = 0.5
CROP_MAX_SIDE = 256


@dataclass(frozen=True)
class Enrollment:
    """What happened to one photo offered for enrollment (or re-embedding)."""

    person: str
    source: str
    status: str  # "enrolled", "already enrolled", "re-embedded" or "refused"
    reason: str = ""


@dataclass(frozen=True)
class GalleryIndex:
    """Every enrolled embedding of one model in one matrix, for nearest-neighbour matching."""

    names: tuple[str, ...]
    person_ids: tuple[str, ...]
    urls: tuple[tuple[str, ...], ...]
    embeddings: np.ndarray  # (faces, model.dimension)
    owners: np.ndarray  # (faces,) index into names
    model: EmbeddingModel = CURRENT
    #: Enrolled photos left out because another model embedded them (see Gallery.reembed).
    stale: int = 0

    def __len__(self) -> int:
        return len(self.names)

    def nearest(self, embedding: np.ndarray) -> tuple[int, float] | None:
        """The closest person (index into ``names``) and the distance to them."""
        if not len(self.owners):
            return None
        distances = self.model.distances(self.embeddings, embedding)
        best = int(np.argmin(distances))
        return int(self.owners[best]), float(distances[best])


class Gallery:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def enroll(self, name: str, photos: Iterable[tuple[str, bytes]], embedder: FaceEmbedder) -> list[Enrollment]:
        """Enroll ``(label, bytes)`` photos of one person; photos that cannot be used are refused."""
        name = name.strip()
        if not name:
            raise GalleryError("a person needs a non-empty name")
        results = []
        for label, data in photos:
            try:
                pixels, face = _single_face(data, embedder)
            except CelebscanError as exc:
                results.append(Enrollment(name, label, "refused", str(exc)))
                continue
            digest = hashlib.sha256(data).hexdigest()
            added = self._store(name, label, digest, face.model, face.embedding, face_crop(pixels, face))
            results.append(Enrollment(name, label, "enrolled" if added else "already enrolled"))
        return results

    def enroll_embeddings(self, name: str, model: EmbeddingModel, embeddings: Iterable[tuple[str, np.ndarray]]) -> int:
        """Enroll ``(label, embedding)`` pairs of ``model`` already made (an unknown group's stored
        faces, no picture read: so no crop is kept, and a later model cannot re-embed them); the
        number added."""
        name = name.strip()
        if not name:
            raise GalleryError("a person needs a non-empty name")
        added = 0
        for label, embedding in embeddings:
            digest = hashlib.sha256(np.asarray(embedding, dtype=np.float64).tobytes()).hexdigest()
            added += self._store(name, label, digest, model, embedding, None)
        return added

    def person_id(self, name: str) -> str:
        """The id faces named ``name`` by the gallery carry (the external id, else the row's)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(people.c.id, people.c.external_id).where(people.c.name == name)).first()
        if row is None:
            raise GalleryError(f"nobody called {name!r} is enrolled")
        return row.external_id or str(row.id)

    def import_folder(self, folder: Path, embedder: FaceEmbedder) -> list[Enrollment]:
        """Enroll ``folder/<person name>/<photos>`` for every person folder."""
        person_dirs = sorted(path for path in Path(folder).iterdir() if path.is_dir())
        if not person_dirs:
            raise GalleryError(f"{folder} has no person folders (expected {folder}/<person name>/<photos>)")
        results = []
        for person_dir in person_dirs:
            results += self.enroll(person_dir.name, _photos_in(person_dir), embedder)
        return results

    def people(self) -> list[tuple[str, int]]:
        """(name, enrolled photos) for every person, by name."""
        with self.engine.connect() as conn:
            query = (
                select(people.c.name, func.count(gallery_faces.c.id))
                .select_from(people.outerjoin(gallery_faces, gallery_faces.c.person_id == people.c.id))
                .group_by(people.c.name)
                .order_by(people.c.name)
            )
            return [(row[0], row[1]) for row in conn.execute(query)]

    def remove(self, name: str) -> None:
        with self.engine.begin() as conn:
            person_id = conn.execute(select(people.c.id).where(people.c.name == name)).scalar()
            if person_id is None:
                raise GalleryError(f"nobody called {name!r} is enrolled")
            conn.execute(delete(gallery_faces).where(gallery_faces.c.person_id == person_id))
            conn.execute(delete(people).where(people.c.id == person_id))

    def stale(self, model: EmbeddingModel = CURRENT) -> int:
        """Enrolled photos whose embedding another model made: not matched until re-embedded."""
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(gallery_faces).where(_other_model(model))
            return int(conn.execute(query).scalar_one())

    def reembed(self, embedder: FaceEmbedder) -> list[Enrollment]:
        """Embed again, with ``embedder``'s model, every photo another model embedded.

        From the kept face crop; else from the photo at the path it was enrolled from, when its bytes
        still have the enrolled hash (a gallery made before crops were kept). What has neither is
        refused with the command that enrolls it again, and stays out of the index.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    gallery_faces.c.id,
                    gallery_faces.c.source,
                    gallery_faces.c.image_hash,
                    gallery_faces.c.face_crop,
                    gallery_faces.c.model,
                    people.c.name,
                )
                .join(people, people.c.id == gallery_faces.c.person_id)
                .where(_other_model(embedder.model))
                .order_by(gallery_faces.c.id)
            ).all()
        results = []
        for row in rows:
            try:
                face, crop = _reembedded(row, embedder)
            except CelebscanError as exc:
                reason = f"enrolled with {row.model or 'an unnamed model'}, cannot be re-embedded: {exc}"
                results.append(Enrollment(row.name, row.source, "refused", reason))
                continue
            with self.engine.begin() as conn:
                conn.execute(
                    update(gallery_faces)
                    .where(gallery_faces.c.id == row.id, _other_model(embedder.model))
                    .values(embedding=embedder.model.to_bytes(face.embedding), model=embedder.model.id, face_crop=crop)
                )
            results.append(Enrollment(row.name, row.source, "re-embedded"))
        return results

    def index(self, model: EmbeddingModel = CURRENT) -> GalleryIndex:
        with self.engine.connect() as conn:
            persons = conn.execute(
                select(people.c.id, people.c.name, people.c.external_id, people.c.urls).order_by(people.c.id)
            ).all()
            embeddings = conn.execute(
                select(gallery_faces.c.person_id, gallery_faces.c.embedding)
                .where(gallery_faces.c.model == model.id)
                .order_by(gallery_faces.c.id)
            ).all()
        stale = self.stale(model)
        if stale:
            log.warning(
                "%d enrolled photos were embedded by another face model than %s and are not matched: "
                "run `celebscan gallery reembed`",
                stale,
                model.id,
            )
        position = {person.id: i for i, person in enumerate(persons)}
        matrix = np.array([model.from_bytes(row.embedding) for row in embeddings], dtype=np.float32)
        return GalleryIndex(
            names=tuple(person.name for person in persons),
            person_ids=tuple(person.external_id or str(person.id) for person in persons),
            urls=tuple(tuple(person.urls or ()) for person in persons),
            embeddings=matrix.reshape(-1, model.dimension),
            owners=np.array([position[row.person_id] for row in embeddings], dtype=np.int64),
            model=model,
            stale=stale,
        )

    def _store(
        self,
        name: str,
        source: str,
        image_hash: str,
        model: EmbeddingModel,
        embedding: np.ndarray,
        crop: bytes | None,
    ) -> bool:
        with self.engine.begin() as conn:
            conn.execute(
                dialect_insert(self.engine, people)
                .values(name=name, urls=[], created_at=utcnow())
                .on_conflict_do_nothing(index_elements=["name"])
            )
            person_id = conn.execute(select(people.c.id).where(people.c.name == name)).scalar_one()
            inserted = conn.execute(
                dialect_insert(self.engine, gallery_faces)
                .values(
                    person_id=person_id,
                    embedding=model.to_bytes(embedding),
                    model=model.id,
                    face_crop=crop,
                    source=source,
                    image_hash=image_hash,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing()
            )
            return inserted.rowcount == 1


def face_crop(pixels: np.ndarray, face: DetectedFace) -> bytes:
    """The face with ``CROP_MARGIN`` of its size around it, as a JPEG at most ``CROP_MAX_SIDE`` px."""
    found = face.detection
    left, top, right, bottom = grown((found.left, found.top, found.right, found.bottom), CROP_MARGIN, pixels.shape)
    crop = Image.fromarray(pixels[top:bottom, left:right])
    crop.thumbnail((CROP_MAX_SIDE, CROP_MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _other_model(model: EmbeddingModel):
    return (gallery_faces.c.model != model.id) | gallery_faces.c.model.is_(None)


def _reembedded(row, embedder: FaceEmbedder) -> tuple[DetectedFace, bytes]:
    """The face of a gallery row embedded by ``embedder``, and the crop to keep."""
    if row.face_crop:
        pixels = decode_image(row.face_crop, ImageLimits(min_side=1)).pixels
        faces = embedder.faces(pixels)
        if not faces:
            raise GalleryError("no face found in its kept crop")
        centre = np.array(pixels.shape[1::-1]) / 2
        return min(faces, key=lambda face: _distance_to(face, centre)), row.face_crop
    path = Path(row.source)
    data = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != row.image_hash:
        raise GalleryError(
            f"no face crop was kept and its photo is not at {row.source}: enroll a photo again "
            f"(celebscan gallery add {row.name!r} PHOTO)"
        )
    pixels, face = _single_face(data, embedder)
    return face, face_crop(pixels, face)


def _distance_to(face: DetectedFace, point: np.ndarray) -> float:
    found = face.detection
    return float(np.hypot((found.left + found.right) / 2 - point[0], (found.top + found.bottom) / 2 - point[1]))


def _single_face(data: bytes, embedder: FaceEmbedder) -> tuple[np.ndarray, DetectedFace]:
    pixels = decode_image(data, ImageLimits(min_side=1)).pixels
    found = embedder.faces(pixels)
    if not found:
        raise GalleryError("no face found; use a photo where the face is clear and upright")
    if len(found) > 1:
        raise GalleryError(f"{len(found)} faces found; use a photo that shows only this person")
    return pixels, found[0]


def _photos_in(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and is_image_name(path.name):
            yield str(path), path.read_bytes()
