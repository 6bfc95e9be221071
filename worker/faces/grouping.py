"""The unknown, grouped: unrecognized faces alike enough become unnamed people, incrementally.

In the manner of Immich's face clustering (``handleRecognizeFaces``), a DBSCAN done one face at a
time: a face with at least ``min_faces`` unnamed neighbours within the model's ``group_distance``
(:mod:`worker.faces.models`; ``CELEBSCAN_UNKNOWN_MAX_DISTANCE`` sets another) is a *core*
face, which joins the group of its nearest grouped neighbour or starts a new group; any other face
is deferred, and tried again after the pass, when it joins the group of a grouped neighbour if it
now has one, else stays ungrouped until a later pass (new faces may make it a core face or give
it a grouped neighbour). Only faces not yet grouped are looked at: faces that later scans or
``follow`` add join the groups without the groups being computed again. A face taken out of its
group by hand is never grouped again; a named face (by the gallery or Rekognition) is in no group.

Memory: faces come from the database a chunk at a time as numpy arrays; neighbours come from the
face index (``worker/faces/index.py``); what a pass keeps besides is the deferred faces' ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, select

from worker.faces import stored
from worker.faces.index import FaceIndex
from worker.faces.models import EmbeddingModel
from worker.queue.labels import KEPT_OUT, FaceLabels
from worker.schema import faces

#: Neighbours asked of the index per face: enough to count ``min_faces`` unnamed ones among named ones.
NEIGHBOURS = 16
PROBES = 4


@dataclass(frozen=True)
class Grouped:
    looked_at: int
    grouped: int
    new_groups: int
    deferred: int


UNGROUPED = (faces.c.name.is_(None), faces.c.unknown_id.is_(None))


class Grouping:
    def __init__(self, engine: Engine, index: FaceIndex, model: EmbeddingModel, min_faces: int = 3) -> None:
        self.engine = engine
        self.index = index
        self.model = model
        self.min_faces = min_faces
        self.max_distance = model.group_distance
        self.labels = FaceLabels(engine)

    def run(self, progress=None) -> Grouped:
        """One pass over the ungrouped unnamed faces, then one over those it deferred."""
        looked_at = grouped = new_groups = 0
        deferred: list[np.ndarray] = []
        chunks = stored.read_chunks(self.engine, self.model, where=_ungrouped())
        for chunk in chunks:
            looked_at += len(chunk)
            placed, made, later = self._place(chunk, cores_only=True)
            grouped, new_groups = grouped + placed, new_groups + made
            deferred.append(later)
            if progress is not None:
                progress(len(chunk))
        waiting = np.concatenate(deferred) if deferred else np.empty(0, np.int64)
        still = 0
        for start in range(0, len(waiting), stored.CHUNK):
            chunk = stored.read_ids(self.engine, self.model, waiting[start : start + stored.CHUNK])
            placed, _, later = self._place(chunk, cores_only=False)
            grouped, still = grouped + placed, still + len(later)
        return Grouped(looked_at, grouped, new_groups, still)

    def _place(self, chunk: stored.Embeddings, cores_only: bool) -> tuple[int, int, np.ndarray]:
        """Group the chunk's faces: (faces grouped, groups made, faces deferred)."""
        distances, neighbours = self.index.nearest(chunk.vectors, NEIGHBOURS + 1, probes=PROBES)
        states = self._states(np.unique(neighbours[neighbours >= 0]))
        joined: dict[int, list[int]] = {}
        made: dict[int, int] = {}  # this chunk's face → a group it starts (written below)
        deferred = []
        for row, face_id in enumerate(chunk.face_ids.tolist()):
            if states.get(face_id, (None, None))[0] is not None:
                continue  # grouped, or named, since the chunk was read
            near = [
                int(other)
                for other, distance in zip(neighbours[row], distances[row], strict=True)
                if other >= 0 and other != face_id and distance <= self.max_distance
            ]
            unnamed = [other for other in near if other in states and states[other][1] is None]
            core = len(unnamed) >= self.min_faces
            if cores_only and not core:
                deferred.append(face_id)
                continue
            group = next((states[o][0] for o in unnamed if states[o][0] not in (None, KEPT_OUT)), None)
            if group is None and not core:
                deferred.append(face_id)
                continue
            if group is None:
                group = -(len(made) + 1)  # a new group, numbered when written
                made[face_id] = group
            joined.setdefault(group, []).append(face_id)
            states[face_id] = (group, None)
        placed = self._write(joined)
        return placed, len(made), np.array(deferred, dtype=np.int64)

    def _states(self, face_ids: np.ndarray) -> dict[int, tuple[int | None, str | None]]:
        """(group, name) of each face still stored with an embedding."""
        states: dict[int, tuple[int | None, str | None]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(face_ids), stored.CHUNK):
                chunk = face_ids[start : start + stored.CHUNK]
                query = select(faces.c.id, faces.c.unknown_id, faces.c.name).where(
                    ids_among(conn, faces.c.id, chunk), faces.c.embedding.is_not(None)
                )
                for face_id, group, name in conn.execute(query):
                    states[face_id] = (group, name)
        return states

    def _write(self, joined: dict[int, list[int]]) -> int:
        """The chunk's faces into their groups, the groups it starts made first: one transaction."""
        with self.engine.begin() as conn:
            new = sorted(group for group in joined if group < 0)
            numbers = dict(zip(new, self.labels.new_groups(conn, self.model.id, len(new)), strict=True))
            placed = [(face_id, numbers.get(group, group)) for group, members in joined.items() for face_id in members]
            return self.labels.group(conn, placed)


def ids_among(conn, column, ids: np.ndarray):
    """``column IN ids``: one array parameter on PostgreSQL (a list of 50,000 bound values costs
    SQLAlchemy's compiler more than the query costs the server)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy import BigInteger, any_, bindparam
        from sqlalchemy.dialects.postgresql import ARRAY

        return column == any_(bindparam("ids", ids.tolist(), type_=ARRAY(BigInteger)))
    return column.in_(ids.tolist())


def _ungrouped():
    from sqlalchemy import and_

    return and_(*UNGROUPED)
