"""Which model made an embedding: the one notion every stored face embedding carries.

An embedding means something only beside the model that made it: two models' vectors live in
different spaces, and a distance between them is noise. So every stored embedding (the gallery's,
and the faces a scan keeps) is stored with its model's ``id``, and embeddings are only ever compared
with embeddings of the same model. A new model gets a new id; what was stored under the old one is
re-embedded (:meth:`worker.faces.gallery.Gallery.reembed`) or left aside, never compared.

Embeddings are unit-length and compared by euclidean distance, so any vector index (faiss, usearch,
pgvector's ``<->``) ranks them as the recognizer does.

Two stored forms: the gallery keeps float32 (:meth:`EmbeddingModel.to_bytes`: a few thousand
photos), the faces a scan keeps float16 (:meth:`EmbeddingModel.pack`: 256 bytes for 128 values, at
10M faces and more). SFace's unit-length values lie within ±0.3, where float16 keeps ~4 significant
digits: a distance moves by < 0.001 against a threshold of 1.128.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from worker.settings import Settings

#: How the faces a scan keeps store their embeddings: little-endian float16.
FACE_DTYPE = np.dtype("<f2")


@dataclass(frozen=True)
class EmbeddingModel:
    """A face embedding model: its stable ``id`` (stored with every embedding), its dimension, the
    largest euclidean distance at which a face is taken for an enrolled person (``threshold``), and
    the largest at which unrecognized faces are neighbours in one unnamed person (``group_distance``:
    tighter, as a group grows by chains of neighbours; measured in bench/unknown_groups.py)."""

    id: str
    dimension: int
    threshold: float
    group_distance: float
    description: str = ""

    def distances(self, stored: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """Euclidean distance from ``embedding`` to each row of ``stored`` (both of this model)."""
        return np.linalg.norm(stored - embedding, axis=1)

    def normalized(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` (one per row) scaled to unit length, as this model's embeddings are stored."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dimension)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, np.float32(1e-12))

    def to_bytes(self, embedding: np.ndarray, dtype: str = "<f4") -> bytes:
        """An embedding as stored: little-endian float32 by default (float16, ``"<f2"``, halves it)."""
        vector = np.asarray(embedding).reshape(-1)
        if vector.size != self.dimension:
            raise ValueError(f"{self.id} embeddings have {self.dimension} values, not {vector.size}")
        return vector.astype(dtype).tobytes()

    def from_bytes(self, data: bytes) -> np.ndarray:
        """An embedding stored by :meth:`to_bytes` (float16, 32 or 64: told apart by the length)."""
        width, remainder = divmod(len(data), self.dimension)
        if remainder or width not in _FLOATS:
            raise ValueError(f"{len(data)} bytes are not a {self.dimension}-value {self.id} embedding")
        return np.frombuffer(data, dtype=_FLOATS[width]).astype(np.float32)

    @property
    def stored_bytes(self) -> int:
        """The size of a face's embedding as a scan keeps it (:meth:`pack`)."""
        return self.dimension * FACE_DTYPE.itemsize

    def pack(self, embedding: np.ndarray) -> bytes:
        """A face's embedding as a scan keeps it: float16."""
        return self.to_bytes(embedding, FACE_DTYPE.str)

    def unpack(self, blobs: Sequence[bytes]) -> np.ndarray:
        """(N, dimension) float32 from embeddings kept by :meth:`pack`."""
        if not blobs:
            return np.empty((0, self.dimension), dtype=np.float32)
        return np.frombuffer(b"".join(blobs), dtype=FACE_DTYPE).reshape(-1, self.dimension).astype(np.float32)

    def tuned(self, threshold: float = 0.0, group_distance: float = 0.0) -> EmbeddingModel:
        """This model matching at ``threshold`` and grouping at ``group_distance`` (0: its own)."""
        return dataclasses.replace(
            self, threshold=threshold or self.threshold, group_distance=group_distance or self.group_distance
        )


_FLOATS = {2: "<f2", 4: "<f4", 8: "<f8"}

#: OpenCV Zoo's SFace (2021dec, block-quantized int8) on faces aligned by YuNet's five landmarks.
#: Threshold: OpenCV's published operating point for SFace (L2 1.128 between unit-length features,
#: cosine similarity 0.363), not tuned on any test set. Group distance 1.0 (cosine similarity 0.5,
#: Immich's default): on faces-dev one person's faces lie up to 0.89 apart, two people's from 1.20
#: (bench/unknown_groups.py, docs/decisions.md).
SFACE = EmbeddingModel(
    "sface-2021dec-int8bq", 128, 1.128, 1.0, "OpenCV Zoo SFace, 112x112 chips aligned on YuNet's five landmarks"
)
#: What galleries made before face models were named hold: dlib's ResNet (face-recognition-models).
#: Kept only to name it; its embeddings are re-embedded with the current model, never compared.
DLIB_RESNET_V1 = EmbeddingModel("dlib-resnet-v1", 128, 0.6, 0.5, "dlib's 128-d ResNet on HOG boxes (before issue 29)")

#: The model the local recognizer embeds with now.
CURRENT = SFACE
KNOWN = {model.id: model for model in (SFACE, DLIB_RESNET_V1)}


def current_model(settings: Settings) -> EmbeddingModel:
    """The model new faces are embedded with, at the threshold and group distance the settings give."""
    return CURRENT.tuned(settings.match_threshold, settings.unknown_max_distance)
