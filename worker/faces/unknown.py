"""The unnamed people: listing the groups of unrecognized faces, naming one, merging two."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, func, select

from worker.errors import GalleryError
from worker.faces import stored
from worker.faces.gallery import Gallery
from worker.faces.models import CURRENT, EmbeddingModel
from worker.queue.labels import KEPT_OUT, FaceLabels
from worker.schema import faces, images, unknown_people

#: Faces of a group enrolled when it is named: those nearest its centre.
ENROLLED_PER_NAME = 10


@dataclass(frozen=True)
class UnknownPerson:
    id: int
    images: int
    faces: int
    sample_faces: tuple[int, ...]  # face ids, a few of its pictures


def unknown_people_found(
    engine: Engine, limit: int | None = None, samples: int = 4, model: EmbeddingModel = CURRENT
) -> list[UnknownPerson]:
    """The groups of ``model``'s faces with pictures not deleted, most pictures first (groups an
    older model made are left aside with its embeddings)."""
    pictures = func.count(func.distinct(faces.c.image_id))
    query = (
        select(faces.c.unknown_id, pictures, func.count())
        .join(images, images.c.id == faces.c.image_id)
        .where(faces.c.unknown_id > KEPT_OUT, faces.c.embedding_model == model.id, images.c.deleted_at.is_(None))
        .group_by(faces.c.unknown_id)
        .order_by(pictures.desc(), faces.c.unknown_id)
    )
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        found = []
        for group, image_count, face_count in rows:
            sample = conn.execute(
                select(faces.c.id).where(faces.c.unknown_id == group).order_by(faces.c.id).limit(samples)
            ).scalars()
            found.append(UnknownPerson(int(group), int(image_count), int(face_count), tuple(sample)))
    return found


def group_faces(engine: Engine, group: int) -> list[tuple[int, int]]:
    """(face id, image id) of a group's faces."""
    with engine.connect() as conn:
        return [
            (face_id, image_id)
            for face_id, image_id in conn.execute(
                select(faces.c.id, faces.c.image_id).where(faces.c.unknown_id == group).order_by(faces.c.id)
            )
        ]


def existing_group(engine: Engine, group: int) -> None:
    with engine.connect() as conn:
        row = conn.execute(select(unknown_people).where(unknown_people.c.id == group)).first()
    if row is None:
        raise GalleryError(f"there is no unknown person {group}")
    if row.merged_into is not None:
        raise GalleryError(f"unknown {group} was merged into unknown {row.merged_into}")
    if row.named is not None:
        raise GalleryError(f"unknown {group} was named {row.named!r}")


def name_group(engine: Engine, model: EmbeddingModel, group: int, name: str) -> tuple[int, int]:
    """Enroll the group as ``name`` (its faces nearest its centre) and name all its faces:
    (faces enrolled, faces named)."""
    existing_group(engine, group)
    members = [face_id for face_id, _ in group_faces(engine, group)]
    if not members:
        raise GalleryError(f"unknown {group} has no faces left")
    embeddings = stored.read_ids(engine, model, members)
    if not len(embeddings):
        raise GalleryError(f"unknown {group}'s faces were embedded by another face model than {model.id}")
    centre = embeddings.vectors.mean(axis=0)
    nearest = np.argsort(((embeddings.vectors - centre) ** 2).sum(axis=1))[:ENROLLED_PER_NAME]
    gallery = Gallery(engine)
    enrolled = gallery.enroll_embeddings(
        name,
        model,
        ((f"unknown {group}, face {embeddings.face_ids[i]}", embeddings.vectors[i]) for i in nearest.tolist()),
    )
    named = FaceLabels(engine).name_group(group, name, gallery.person_id(name))
    return enrolled, named


def merge(engine: Engine, source: int, into: int) -> int:
    if source == into:
        raise GalleryError("a group cannot be merged into itself")
    existing_group(engine, source)
    existing_group(engine, into)
    return FaceLabels(engine).merge(source, into)
