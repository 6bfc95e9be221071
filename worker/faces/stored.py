"""The embeddings kept with the faces, read back as numpy arrays in chunks.

Readers never hold a Python object per face: each chunk of up to ``CHUNK`` faces arrives as one
array of ids and one float32 matrix, whatever the number of faces stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, func, select

from worker.faces.encoder import unpack
from worker.schema import faces

CHUNK = 50_000


@dataclass(frozen=True)
class Embeddings:
    """Faces (their ``faces.id``) and their embeddings, row for row."""

    face_ids: np.ndarray  # (N,) int64
    vectors: np.ndarray  # (N, dimension) float32

    def __len__(self) -> int:
        return len(self.face_ids)


def read_chunks(
    engine: Engine, model: str, dimension: int, *, after: int = 0, upto: int | None = None, where=None
) -> Iterator[Embeddings]:
    """The embeddings of ``model`` of faces with ``after < id <= upto`` (and ``where``), by id."""
    last = after
    while True:
        query = select(faces.c.id, faces.c.embedding).where(
            faces.c.id > last, faces.c.embedding_model == model, faces.c.embedding.is_not(None)
        )
        if upto is not None:
            query = query.where(faces.c.id <= upto)
        if where is not None:
            query = query.where(where)
        with engine.connect() as conn:
            rows = conn.execute(query.order_by(faces.c.id).limit(CHUNK)).all()
        if not rows:
            return
        yield _as_arrays(rows, dimension)
        last = rows[-1][0]


def read_ids(engine: Engine, model: str, dimension: int, face_ids) -> Embeddings:
    """The embeddings of these faces that still have one of ``model``."""
    found: list = []
    ids = [int(i) for i in face_ids]
    with engine.connect() as conn:
        for start in range(0, len(ids), 1000):
            found += conn.execute(
                select(faces.c.id, faces.c.embedding).where(
                    faces.c.id.in_(ids[start : start + 1000]),
                    faces.c.embedding_model == model,
                    faces.c.embedding.is_not(None),
                )
            ).all()
    return _as_arrays(found, dimension)


def models(engine: Engine) -> list[tuple[str, int]]:
    """(model id, faces) of the embeddings stored, most first."""
    with engine.connect() as conn:
        count = func.count()
        rows = conn.execute(
            select(faces.c.embedding_model, count)
            .where(faces.c.embedding_model.is_not(None))
            .group_by(faces.c.embedding_model)
            .order_by(count.desc())
        )
        return [(model, int(n)) for model, n in rows]


def _as_arrays(rows, dimension: int) -> Embeddings:
    return Embeddings(np.array([row[0] for row in rows], dtype=np.int64), unpack([row[1] for row in rows], dimension))
