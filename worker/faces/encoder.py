"""The embedding model stored faces are made with, and the one seam that makes them.

Every stored embedding carries the id of the model that made it, and embeddings of two models are
never compared: a face stored by one model is matched, searched and grouped only among faces of
that model. ``FaceEncoder`` is what the rest of celebscan asks for an embedding: the current
model's identity, and the embeddings of faces at boxes another detector found (Rekognition's), so
a newer model (issue 29's) plugs in here without touching the store, the index or the labels.

Stored form: float16, 256 bytes for a 128-d vector (dlib's descriptors lie within ±0.5, where
float16 keeps ~4 significant digits: a distance moves by < 0.001 against a threshold of 0.6).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from worker.settings import Settings

if TYPE_CHECKING:
    from worker.faces.embeddings import FaceEmbedder

STORED_DTYPE = np.dtype("<f2")


@dataclass(frozen=True)
class EmbeddingModel:
    """An embedding model's identity: its stable id (stored with every face), its vectors' size, and
    the largest euclidean distance at which two faces are the same person."""

    id: str
    dimension: int
    threshold: float

    @property
    def stored_bytes(self) -> int:
        return self.dimension * STORED_DTYPE.itemsize


#: dlib's ResNet (``dlib_face_recognition_resnet_model_v1.dat``), as the local recognizer uses it.
DLIB_RESNET_V1 = EmbeddingModel("dlib-resnet-v1", 128, 0.6)


class FaceEncoder(Protocol):
    model: EmbeddingModel

    def embed_at(self, pixels: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        """(N, dimension) embeddings of the faces at pixel boxes (left, top, right, bottom) of an RGB image."""
        ...


class DlibEncoder:
    """dlib's landmarks, aligned chip and ResNet at given boxes (no detection: a few ms a face).

    One per process, shared by a run's threads (its calls in flight): they take turns, as dlib's
    and numpy's work here is CPU-bound.
    """

    model = DLIB_RESNET_V1

    def __init__(self, embedder: FaceEmbedder) -> None:
        self._embedder = embedder
        self._turn = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> DlibEncoder:
        from worker.faces.embeddings import FaceEmbedder

        return cls(FaceEmbedder.from_settings(settings))

    def embed_at(self, pixels: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        with self._turn:
            return self._embedder.embed_at(pixels, boxes)


def current_model(settings: Settings | None = None) -> EmbeddingModel:
    """The model new faces are embedded with (its threshold the one the settings give)."""
    threshold = (settings or Settings()).match_threshold
    return EmbeddingModel(DLIB_RESNET_V1.id, DLIB_RESNET_V1.dimension, threshold)


def pack(vector: np.ndarray) -> bytes:
    """An embedding as stored: little-endian float16."""
    return np.asarray(vector, dtype=STORED_DTYPE).tobytes()


def unpack(blobs: Sequence[bytes], dimension: int = DLIB_RESNET_V1.dimension) -> np.ndarray:
    """(N, dimension) float32 from stored embeddings."""
    if not blobs:
        return np.empty((0, dimension), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=STORED_DTYPE).reshape(-1, dimension).astype(np.float32)
