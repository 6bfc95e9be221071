"""dlib face detection and 128-d embeddings, as plain data.

A small face API in the spirit of ``face_recognition``, without its globals: a ``FaceEmbedder`` loads
the three dlib models once when it is built (one per process) and turns an RGB array into
``DetectedFace`` records. dlib is imported lazily so that the producer and the Rekognition backend
never need it.

Speed choices: detection runs on a copy downscaled to ``detect_max_side`` (the HOG detector's cost
grows with pixels, and faces in large photos are large), small images are upsampled so faces down
to ~20 px are found, and landmarks and embeddings are computed on the original pixels, where the
150x150 aligned chip keeps full detail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from worker.errors import MissingDependencyError

EMBEDDING_SIZE = 128
INSTALL_HINT = "pip install 'celebscan[local]'"


@dataclass(frozen=True)
class DetectedFace:
    """One face: its pixel box in the original image, the detector's score and its embedding."""

    left: int
    top: int
    right: int
    bottom: int
    score: float
    embedding: np.ndarray

    @property
    def confidence(self) -> float:
        """The detector score on Rekognition's 0–100 scale (a logistic squash; score 0 → 50)."""
        return 100.0 / (1.0 + math.exp(-2.0 * self.score))


class FaceEmbedder:
    @staticmethod
    def check_installed() -> None:
        """Raise :class:`MissingDependencyError` (with the pip command) when dlib is not installed."""
        _import_dlib()

    def __init__(self, *, detect_max_side: int = 1024, min_score: float = 0.2) -> None:
        dlib, models = _import_dlib()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
        self._encoder = dlib.face_recognition_model_v1(models.face_recognition_model_location())
        self.detect_max_side = detect_max_side
        self.min_score = min_score

    def detect(self, pixels: np.ndarray) -> list[tuple[object, float]]:
        """(dlib rectangle in ``pixels``' coordinates, detector score) of every face, strongest first.

        Detection alone, without embeddings: what the face prefilter needs (~0.1 s an image).
        """
        pixels = np.ascontiguousarray(pixels)
        height, width = pixels.shape[:2]
        scale = min(1.0, self.detect_max_side / max(height, width))
        small = pixels if scale == 1.0 else _resize(pixels, scale)
        rects, scores, _ = self._detector.run(small, _upsample_times(small), self.min_score)
        return [
            (self._dlib.rectangle(round(rect.left() / scale), round(rect.top() / scale),
                                  round(rect.right() / scale), round(rect.bottom() / scale)), float(score))
            for rect, score in sorted(zip(rects, scores, strict=True), key=lambda pair: -pair[1])
        ]

    def faces(self, pixels: np.ndarray) -> list[DetectedFace]:
        """Every face in an upright RGB ``uint8`` array, strongest detection first."""
        pixels = np.ascontiguousarray(pixels)
        found = []
        for box, score in self.detect(pixels):
            shape = self._landmarks(pixels, box)
            embedding = np.asarray(self._encoder.compute_face_descriptor(pixels, shape), dtype=np.float64)
            found.append(
                DetectedFace(box.left(), box.top(), box.right(), box.bottom(), float(score), embedding)
            )
        return found


def _upsample_times(pixels: np.ndarray) -> int:
    """The HOG detector finds faces of ~80 px and up; upsample small images so small faces count."""
    longest = max(pixels.shape[:2])
    if longest < 400:
        return 2
    if longest < 800:
        return 1
    return 0


def _resize(pixels: np.ndarray, scale: float) -> np.ndarray:
    height, width = pixels.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))


def _import_dlib():
    try:
        import dlib
        import face_recognition_models
    except ImportError as exc:
        raise MissingDependencyError(
            f"the local recognizer needs dlib and its models ({exc.name} is missing): {INSTALL_HINT}"
        ) from exc
    return dlib, face_recognition_models
