"""The embeddings kept with the faces, read back as numpy arrays in chunks.

Readers never hold a Python object per face: each chunk of up to ``CHUNK`` faces arrives as one
array of ids and one float32 matrix, whatever the number of faces stored.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sqlalchemy import BigInteger, Engine, cast, func, select

from worker.faces.models import FACE_DTYPE, EmbeddingModel
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
    engine: Engine, model: EmbeddingModel, *, after: int = 0, upto: int | None = None, where=None
) -> Iterator[Embeddings]:
    """The embeddings of ``model`` of faces with ``after < id <= upto`` (and ``where``), by id."""
    last = after
    while True:
        query = select(cast(faces.c.id, BigInteger), faces.c.embedding).where(
            faces.c.id > last, faces.c.embedding_model == model.id, faces.c.embedding.is_not(None)
        )
        if upto is not None:
            query = query.where(faces.c.id <= upto)
        if where is not None:
            query = query.where(where)
        query = query.order_by(faces.c.id).limit(CHUNK)
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                chunk = _copied(conn, query, model)
            else:
                chunk = _as_arrays(conn.execute(query).all(), model)
        if not len(chunk):
            return
        yield chunk
        last = int(chunk.face_ids[-1])


def read_ids(engine: Engine, model: EmbeddingModel, face_ids) -> Embeddings:
    """The embeddings of these faces that still have one of ``model``."""
    found: list = []
    ids = [int(i) for i in face_ids]
    with engine.connect() as conn:
        for start in range(0, len(ids), 1000):
            found += conn.execute(
                select(faces.c.id, faces.c.embedding).where(
                    faces.c.id.in_(ids[start : start + 1000]),
                    faces.c.embedding_model == model.id,
                    faces.c.embedding.is_not(None),
                )
            ).all()
    return _as_arrays(found, model)


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


def _copy_record(model: EmbeddingModel) -> np.dtype:
    """A row of ``COPY (SELECT id, embedding ...) TO STDOUT (FORMAT binary)``: its field count,
    then each field's length and value, big-endian."""
    return np.dtype(
        [
            ("fields", ">i2"),
            ("id_length", ">i4"),
            ("id", ">i8"),
            ("length", ">i4"),
            ("vector", FACE_DTYPE, (model.dimension,)),
        ]
    )


#: COPY's binary header: signature, flags, header extension length.
_COPY_HEADER = 19


def _copied(conn, query, model: EmbeddingModel) -> Embeddings:
    """The chunk through PostgreSQL's binary COPY, parsed by numpy as fixed-size records: ~10x
    fewer cycles a face than a row per face through the driver (measured in bench/faces_scale.py)."""
    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    buffer = io.BytesIO()
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(f"COPY ({sql}) TO STDOUT (FORMAT binary)", buffer)
    data = buffer.getbuffer()[_COPY_HEADER : len(buffer.getbuffer()) - 2]  # the trailer: -1 as int16
    records = np.frombuffer(data, dtype=_copy_record(model))
    if len(records) and not (records["length"] == model.stored_bytes).all():
        raise ValueError(f"stored {model.id} embeddings of another size than {model.dimension} float16 values")
    return Embeddings(records["id"].astype(np.int64), records["vector"].astype(np.float32))


def _as_arrays(rows, model: EmbeddingModel) -> Embeddings:
    return Embeddings(np.array([row[0] for row in rows], dtype=np.int64), model.unpack([row[1] for row in rows]))
