"""Who a stored face is, decided again from its embedding: after enrolling, removing or naming a
person, or a change of threshold. No picture is read, no recognizer called.

The rule is the local recognizer's: a face is the enrolled person nearest to it when within the
threshold, else unknown. A face Rekognition named keeps its celebrity name; every other face (the
faces of a local scan, Rekognition's unrecognized ones) is the gallery's to name. A face within
the threshold of two people is the nearer one's (as at scan time). The transitions themselves are
``worker/queue/labels.py``'s.

Which faces to look at: enrolling P can only change faces within the threshold of one of P's
enrolled embeddings (found by an exhaustive, exact range search of the face index), and removing P
only the faces named P; each of those is matched again against the whole gallery.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, select

from worker.faces.gallery import Gallery, GalleryIndex
from worker.faces.index import FaceIndex
from worker.faces.models import EmbeddingModel, current_model
from worker.queue.labels import CHUNK, GALLERY_MAY_CHANGE, FaceLabels, Relabel
from worker.recognizers.local import match_confidence
from worker.schema import GALLERY, faces
from worker.settings import Settings


@dataclass(frozen=True)
class Labelled:
    """What a labelling did: faces looked at, and faces whose name changed."""

    looked_at: int
    changed: int


class Labeller:
    def __init__(self, engine: Engine, settings: Settings, model: EmbeddingModel | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.model = model or current_model(settings)
        self.labels = FaceLabels(engine)

    def index(self) -> FaceIndex:
        index = FaceIndex(self.engine, self.model, self.settings.face_index_dir)
        index.refresh()
        return index

    def after_enrolling(self, names: Iterable[str]) -> Labelled:
        """Name every stored face that one of these (newly enrolled) people is now nearest to."""
        gallery = Gallery(self.engine).index()
        wanted = {i for i, name in enumerate(gallery.names) if name in set(names)}
        vectors = gallery.embeddings[np.isin(gallery.owners, list(wanted))]
        if not len(vectors):
            return Labelled(0, 0)
        found = self.index().within(vectors.astype(np.float32), self.model.threshold)
        return self._decide(gallery, _union(ids for ids, _ in found))

    def after_removing(self, name: str) -> Labelled:
        """Match again every face the gallery had named ``name`` (who is no longer enrolled)."""
        named = self._ids(select(faces.c.id).where(faces.c.name == name, faces.c.labelled_by == GALLERY))
        return self._decide(Gallery(self.engine).index(), named)

    def everyone(self) -> Labelled:
        """Match again every face the gallery named or could name (after the threshold changed)."""
        gallery = Gallery(self.engine).index()
        found = self.index().within(gallery.embeddings.astype(np.float32), self.model.threshold) if len(gallery) else []
        named = self._ids(select(faces.c.id).where(faces.c.labelled_by == GALLERY))
        return self._decide(gallery, _union([named, *(ids for ids, _ in found)]))

    def _ids(self, query) -> np.ndarray:
        """The face ids a query returns, streamed into one array (8 bytes a face)."""
        with self.engine.connect() as conn:
            rows = conn.execution_options(yield_per=CHUNK).execute(query).scalars()
            return np.fromiter(rows, dtype=np.int64)

    def _decide(self, gallery: GalleryIndex, face_ids: np.ndarray) -> Labelled:
        looked_at = changed = 0
        for start in range(0, len(face_ids), CHUNK):
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(
                        faces.c.id,
                        faces.c.image_id,
                        faces.c.name,
                        faces.c.person_id,
                        faces.c.embedding,
                        faces.c.embedding_model,
                    ).where(faces.c.id.in_(face_ids[start : start + CHUNK].tolist()), GALLERY_MAY_CHANGE)
                ).all()
            looked_at += len(rows)
            changes = [change for change in self._changes(gallery, rows) if change is not None]
            changed += self.labels.relabel(changes)
        return Labelled(looked_at, changed)

    def _changes(self, gallery: GalleryIndex, rows) -> list[Relabel | None]:
        comparable = [row for row in rows if row.embedding is not None and row.embedding_model == self.model.id]
        nearest = _nearest(gallery, self.model.unpack([row.embedding for row in comparable]))
        best = {row.id: match for row, match in zip(comparable, nearest, strict=True)}
        changes: list[Relabel | None] = []
        for row in rows:
            person, distance = best.get(row.id, (None, None))
            if person is None or distance is None or distance > self.model.threshold:
                changes.append(Relabel(row.id, row.image_id, row.name) if row.name is not None else None)
                continue
            name, person_id = gallery.names[person], gallery.person_ids[person]
            if (row.name, row.person_id) == (name, person_id):
                changes.append(None)
                continue
            confidence = match_confidence(distance, self.model.threshold)
            changes.append(Relabel(row.id, row.image_id, row.name, name, person_id, confidence))
        return changes


def _union(arrays: Iterable[np.ndarray]) -> np.ndarray:
    parts = list(arrays)
    return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)


def _nearest(gallery: GalleryIndex, vectors: np.ndarray) -> list[tuple[int | None, float | None]]:
    """For each vector, the nearest enrolled person (index into the gallery's names) and the distance."""
    if not len(vectors) or not len(gallery.owners):
        return [(None, None)] * len(vectors)
    enrolled = gallery.embeddings.astype(np.float32)
    squared = (vectors**2).sum(axis=1)[:, None] - 2 * vectors @ enrolled.T + (enrolled**2).sum(axis=1)[None, :]
    best = squared.argmin(axis=1)
    distances = np.sqrt(np.maximum(squared[np.arange(len(vectors)), best], 0))
    return [(int(gallery.owners[b]), float(d)) for b, d in zip(best, distances, strict=True)]
