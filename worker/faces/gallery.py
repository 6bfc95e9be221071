"""The local recognizer's known people: enrollment, listing, removal, and the in-memory index.

Each enrolled photo must show exactly one face; its 128-d embedding is stored with the person.
Enrolling the same photo twice is a no-op (photos are identified by content hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, delete, func, select

from worker.database import utcnow
from worker.errors import CelebscanError, GalleryError
from worker.faces.embeddings import EMBEDDING_SIZE, FaceEmbedder
from worker.media.images import ImageLimits, decode_image, is_image_name
from worker.schema import gallery_faces, people
from worker.sql import dialect_insert


@dataclass(frozen=True)
class Enrollment:
    """What happened to one photo offered for enrollment."""

    person: str
    source: str
    status: str  # "enrolled", "already enrolled" or "refused"
    reason: str = ""


@dataclass(frozen=True)
class GalleryIndex:
    """Every enrolled embedding in one matrix, for nearest-neighbour matching."""

    names: tuple[str, ...]
    person_ids: tuple[str, ...]
    urls: tuple[tuple[str, ...], ...]
    embeddings: np.ndarray  # (faces, 128)
    owners: np.ndarray  # (faces,) index into names

    def __len__(self) -> int:
        return len(self.names)

    def nearest(self, embedding: np.ndarray) -> tuple[int, float] | None:
        """The closest person (index into ``names``) and the euclidean distance to them."""
        if not len(self.owners):
            return None
        distances = np.linalg.norm(self.embeddings - embedding, axis=1)
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
                embedding = _single_face_embedding(data, embedder)
            except CelebscanError as exc:
                results.append(Enrollment(name, label, "refused", str(exc)))
                continue
            added = self._store(name, label, hashlib.sha256(data).hexdigest(), embedding)
            results.append(Enrollment(name, label, "enrolled" if added else "already enrolled"))
        return results

    def enroll_embeddings(self, name: str, embeddings: Iterable[tuple[str, np.ndarray]]) -> int:
        """Enroll ``(label, embedding)`` pairs already made (an unknown group's faces); the number added."""
        name = name.strip()
        if not name:
            raise GalleryError("a person needs a non-empty name")
        added = 0
        for label, embedding in embeddings:
            digest = hashlib.sha256(np.asarray(embedding, dtype=np.float64).tobytes()).hexdigest()
            added += self._store(name, label, digest, embedding)
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

    def index(self) -> GalleryIndex:
        with self.engine.connect() as conn:
            persons = conn.execute(
                select(people.c.id, people.c.name, people.c.external_id, people.c.urls).order_by(people.c.id)
            ).all()
            embeddings = conn.execute(
                select(gallery_faces.c.person_id, gallery_faces.c.embedding).order_by(gallery_faces.c.id)
            ).all()
        position = {person.id: i for i, person in enumerate(persons)}
        matrix = np.array(
            [np.frombuffer(row.embedding, dtype=np.float64) for row in embeddings], dtype=np.float64
        ).reshape(-1, EMBEDDING_SIZE)
        return GalleryIndex(
            names=tuple(person.name for person in persons),
            person_ids=tuple(person.external_id or str(person.id) for person in persons),
            urls=tuple(tuple(person.urls or ()) for person in persons),
            embeddings=matrix,
            owners=np.array([position[row.person_id] for row in embeddings], dtype=np.int64),
        )

    def _store(self, name: str, source: str, image_hash: str, embedding: np.ndarray) -> bool:
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
                    embedding=embedding.astype(np.float64).tobytes(),
                    source=source,
                    image_hash=image_hash,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing()
            )
            return inserted.rowcount == 1


def _single_face_embedding(data: bytes, embedder: FaceEmbedder) -> np.ndarray:
    image = decode_image(data, ImageLimits(min_side=1))
    found = embedder.faces(image.pixels)
    if not found:
        raise GalleryError("no face found; use a photo where the face is clear and upright")
    if len(found) > 1:
        raise GalleryError(f"{len(found)} faces found; use a photo that shows only this person")
    return found[0].embedding


def _photos_in(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and is_image_name(path.name):
            yield str(path), path.read_bytes()
