"""The vector index of the stored faces: faiss, built from the database, refreshed incrementally.

The database is the source of truth; the index is a file per database and model in
``CELEBSCAN_FACE_INDEX_DIR`` that the command needing it (``find``, labelling, grouping) brings up
to date before it asks anything: the faces written since (ids past its watermark) are added, and
the faces whose embedding left the database since (``face_removals``, worker/faces/removals.py)
are dropped, so an erased embedding leaves the file at the next refresh of any index. Workers only
write embeddings; no process but the one that asks keeps an index.

Kind, by size (measured: docs/decisions.md): up to ``FLAT_LIMIT`` faces an exact scan of float16
vectors; past it an inverted file (IVF, float16 codes, an HNSW graph over its centroids), whose
search reads ``nprobe`` lists of ~``N / nlist`` faces. Both return the faces within a radius, and
an exhaustive range search (every list) is exact: labelling uses that, ``find`` the probes.
A file older than the schema's removals, or of a database that was made again, is rebuilt.

On PostgreSQL a refresh reads its watermarks under ``SHARE`` locks on ``faces`` and
``face_removals`` (held for microseconds; writers wait that long): a batch's face ids are taken
from a sequence before its transaction commits, so without it a refresh could pass an id that
commits later. SQLite has one writer at a time and hands out ids in commit order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select, text

from worker.errors import MissingDependencyError
from worker.faces import stored
from worker.faces.models import EmbeddingModel
from worker.schema import face_removals, faces

log = logging.getLogger(__name__)

FLAT_LIMIT = 100_000
#: The inverted file is trained again (rebuilt) once it holds this many times the faces it was built with.
REBUILD_GROWTH = 8
DEFAULT_PROBES = 32
MAX_LISTS = 4096
INSTALL_HINT = "pip install '.[local]' in a clone of celebscan"


@dataclass(frozen=True)
class Refreshed:
    added: int
    removed: int
    rebuilt: bool
    seconds: float


class FaceIndex:
    """The faces of one embedding model, searchable by euclidean distance."""

    def __init__(self, engine: Engine, model: EmbeddingModel, directory: str | Path) -> None:
        self.engine = engine
        self.model = model
        key = hashlib.sha256(engine.url.render_as_string(hide_password=True).encode()).hexdigest()[:16]
        folder = Path(directory).expanduser()
        self.path = folder / f"{key}-{model.id}.faiss"
        self._meta_path = folder / f"{key}-{model.id}.json"
        self._faiss = _import_faiss()
        self._index: Any = None
        self._mapped = False
        self._meta: dict = {}

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    # -- keeping it up to date ---------------------------------------------------------------------

    def refresh(self) -> Refreshed:
        """Bring the index up to date with the database (built the first time), and save it."""
        started = time.monotonic()
        face_mark, removal_mark, database_faces = self._watermarks()
        self._load()
        rebuilt = self._stale(face_mark, removal_mark, database_faces)
        if rebuilt:
            self._build(face_mark, database_faces)
            self._meta.update(faces=face_mark, removals=removal_mark)
            added, removed = len(self), 0
        else:
            if self._mapped and (face_mark > self._meta["faces"] or removal_mark > self._meta["removals"]):
                self._load(writable=True)
            removed = self._apply_removals(removal_mark)
            added = self._add(self._meta["faces"], face_mark)
            self._meta.update(faces=face_mark, removals=removal_mark)
        if added or removed or rebuilt:
            self._save()
        return Refreshed(added, removed, rebuilt, time.monotonic() - started)

    def _watermarks(self) -> tuple[int, int, int]:
        """(last face id, last removal, faces of the model) as of now, every lower id committed."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("LOCK TABLE faces, face_removals IN SHARE MODE"))
            face_mark = conn.execute(select(func.coalesce(func.max(faces.c.id), 0))).scalar_one()
            removal_mark = conn.execute(select(func.coalesce(func.max(face_removals.c.seq), 0))).scalar_one()
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":  # the planner's estimate: enough to size the index
                count = conn.execute(text("SELECT reltuples::bigint FROM pg_class WHERE relname = 'faces'")).scalar()
            else:
                count = conn.execute(select(func.count()).where(faces.c.embedding_model == self.model.id)).scalar()
        return int(face_mark), int(removal_mark), max(0, int(count or 0))

    def _stale(self, face_mark: int, removal_mark: int, database_faces: int) -> bool:
        if self._index is None:
            return True
        if removal_mark > self._meta.get("removals", 0) and self._ids_reused():
            return True  # a face id removed may be a new face's now: start again
        if self._meta.get("faces", 0) > face_mark or self._meta.get("removals", 0) > removal_mark:
            return True  # a database made again under the same URL
        built_with = self._meta.get("built_with", 0)
        if self._meta.get("kind") == "flat":
            return database_faces > FLAT_LIMIT
        return database_faces > REBUILD_GROWTH * max(built_with, 1)

    def _ids_reused(self) -> bool:
        """A SQLite database made before faces' ids were AUTOINCREMENT gives a deleted id out again."""
        if self.engine.dialect.name != "sqlite":
            return False
        with self.engine.connect() as conn:
            made = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'faces'")).scalar() or ""
        return "AUTOINCREMENT" not in made.upper()

    def _build(self, face_mark: int, database_faces: int) -> None:
        faiss = self._faiss
        dimension = self.model.dimension
        if database_faces <= FLAT_LIMIT:
            index = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_fp16))
            kind, lists = "flat", 0
        else:
            lists = _lists_for(database_faces)
            quantizer = faiss.IndexHNSWFlat(dimension, 32)
            index = faiss.IndexIVFScalarQuantizer(quantizer, dimension, lists, faiss.ScalarQuantizer.QT_fp16)
            index.cp.niter = 10
            # k-means assigns with an exact flat index (the HNSW graph is built once, from the
            # centroids): training through the graph was 10x slower (114 s for 2,048 lists).
            index.clustering_index = faiss.IndexFlatL2(dimension)
            index.train(self._training_sample(face_mark, 30 * lists))
            kind = "ivf"
        self._index, self._mapped = index, False
        self._meta = {"kind": kind, "lists": lists, "faces": 0, "removals": 0, "built_with": database_faces}
        self._add(0, face_mark)
        self._meta["built_with"] = len(self)
        log.info("built the %s face index of %d faces (%s)", self.model.id, len(self), kind)

    def _training_sample(self, face_mark: int, size: int) -> np.ndarray:
        """Up to ``size`` embeddings spread over the ids (every k-th chunk's head): k-means needs a
        sample like the whole, not all of it in memory."""
        parts, total = [], 0
        step = max(1, face_mark // max(1, size // 1000))
        for start in range(0, face_mark, step):
            chunk = next(
                stored.read_chunks(self.engine, self.model, after=start, upto=start + step),
                None,
            )
            if chunk is not None:
                parts.append(chunk.vectors[:1000])
                total += len(parts[-1])
            if total >= size:
                break
        return np.concatenate(parts) if parts else np.empty((0, self.model.dimension), dtype=np.float32)

    def _add(self, after: int, upto: int) -> int:
        added = 0
        for chunk in stored.read_chunks(self.engine, self.model, after=after, upto=upto):
            self._index.add_with_ids(chunk.vectors, chunk.face_ids)
            added += len(chunk)
        return added

    def _apply_removals(self, removal_mark: int) -> int:
        """Drop the faces removed since the last refresh."""
        seen = self._meta.get("removals", 0)
        if removal_mark <= seen:
            return 0
        removed = 0
        while seen < removal_mark:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(face_removals.c.seq, face_removals.c.face_id)
                    .where(face_removals.c.seq > seen, face_removals.c.seq <= removal_mark)
                    .order_by(face_removals.c.seq)
                    .limit(stored.CHUNK)
                ).all()
            if not rows:
                break
            ids = np.unique(np.array([row.face_id for row in rows], dtype=np.int64))
            removed += int(self._index.remove_ids(ids))
            seen = rows[-1].seq
        return removed

    # -- the file ----------------------------------------------------------------------------------

    def _load(self, writable: bool = False) -> None:
        """The index from its file: mapped into memory (read at once, paged in as searched: a new
        process's first search does not wait for gigabytes to be read), or read whole to be changed."""
        if self._index is not None and not (writable and self._mapped):
            return
        if not self.path.is_file() or not self._meta_path.is_file():
            return
        try:
            self._meta = json.loads(self._meta_path.read_text())
            flags = 0 if writable else self._faiss.IO_FLAG_MMAP
            self._index = self._faiss.read_index(str(self.path), flags)
            self._mapped = not writable
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("rebuilding the unreadable face index %s: %s", self.path, exc)
            self._index, self._meta, self._mapped = None, {}, False

    def _save(self) -> None:
        """Write the index and its watermarks, each replaced atomically (the index first: watermarks
        never claim more than the file holds)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".part", delete=False) as part:
            pass
        self._faiss.write_index(self._index, part.name)
        os.replace(part.name, self.path)
        meta = self._meta_path.with_suffix(".json.part")
        meta.write_text(json.dumps(self._meta))
        os.replace(meta, self._meta_path)

    def forget_file(self) -> None:
        """Delete the index's files (they are rebuilt from the database when next needed)."""
        for path in (self.path, self._meta_path):
            path.unlink(missing_ok=True)
        self._index, self._meta, self._mapped = None, {}, False

    # -- asking ------------------------------------------------------------------------------------

    def nearest(self, vectors: np.ndarray, count: int, probes: int = DEFAULT_PROBES) -> tuple[np.ndarray, np.ndarray]:
        """(distances, face ids), each (len(vectors), count), nearest first; id -1 past the faces found."""
        if not len(self):
            empty = np.full((len(vectors), count), -1, dtype=np.int64)
            return np.full(empty.shape, np.inf, dtype=np.float32), empty
        self._probe(probes)
        squared, ids = self._index.search(np.ascontiguousarray(vectors, dtype=np.float32), count)
        return np.sqrt(np.maximum(squared, 0)), ids

    def within(
        self, vectors: np.ndarray, radius: float, probes: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each vector, (face ids, distances) of every face within ``radius``; ``probes`` None:
        every list (exact)."""
        if not len(self):
            return [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)) for _ in vectors]
        self._probe(probes)
        limits, squared, ids = self._index.range_search(
            np.ascontiguousarray(vectors, dtype=np.float32), float(radius) ** 2
        )
        distances = np.sqrt(np.maximum(squared, 0))
        return [(ids[limits[i] : limits[i + 1]], distances[limits[i] : limits[i + 1]]) for i in range(len(vectors))]

    def _probe(self, probes: int | None) -> None:
        if self._meta.get("kind") == "ivf":
            lists = self._meta["lists"]
            self._index.nprobe = lists if probes is None else min(lists, probes)
            self._faiss.downcast_index(self._index.quantizer).hnsw.efSearch = max(32, 2 * self._index.nprobe)


def _lists_for(faces_count: int) -> int:
    """Inverted lists for ``faces_count`` faces: a power of two near 4·√N (faiss's guidance), 1,024 to
    ``MAX_LISTS`` (k-means over 30 samples a list costs lists² · 30: 16,384 lists took longer to train
    than the 10M faces take to add, and 4,096 keep a query's 32 lists at ~80,000 faces at 10M)."""
    return int(min(MAX_LISTS, max(1024, 2 ** round(math.log2(4 * math.sqrt(faces_count))))))


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(f"the face index needs faiss ({exc.name} is missing): {INSTALL_HINT}") from exc
    return faiss
