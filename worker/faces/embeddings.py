"""Faces as plain data: YuNet's detections with SFace embeddings, stamped with their model.

A small face API in the spirit of ``face_recognition``, without its globals: a ``FaceEmbedder`` loads
the two ONNX models once when it is built (one per process) and turns an RGB array into
``DetectedFace`` records. OpenCV is imported lazily, so that the producer and a Rekognition-only
worker never need it.

Each face is aligned on its five landmarks to SFace's 112x112 template (the similarity transform
that best maps them, as OpenCV's ``FaceRecognizerSF.alignCrop`` does; written here because that
class cannot set its network's input under OpenCV 5's engine) and embedded in one batch per image.
:meth:`FaceEmbedder.embed` takes landmarks from elsewhere (Rekognition returns the same five points).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.faces.detection import Detection, FaceDetector
from worker.faces.models import CURRENT, EmbeddingModel
from worker.faces.weights import SFACE, import_cv2
from worker.settings import Settings

CHIP_SIZE = 112
#: Where SFace's training aligned the five landmarks in its 112x112 chips (OpenCV's face_recognize.cpp).
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face: where it is (pixels of the original image), the detector's score, its embedding."""

    detection: Detection
    embedding: np.ndarray
    model: EmbeddingModel

    @property
    def confidence(self) -> float:
        return self.detection.confidence


class FaceEmbedder:
    model = CURRENT

    def __init__(self, detector: FaceDetector | None = None) -> None:
        self._cv2 = cv2 = import_cv2()
        self.detector = detector or FaceDetector()
        self._net = cv2.dnn.readNetFromONNX(np.frombuffer(SFACE.read(), dtype=np.uint8))

    @classmethod
    def from_settings(cls, settings: Settings) -> FaceEmbedder:
        return cls(FaceDetector.from_settings(settings))

    def faces(self, pixels: np.ndarray) -> list[DetectedFace]:
        """Every face in an upright RGB ``uint8`` array, strongest detection first."""
        detections = self.detector.detect(pixels)
        if not detections:
            return []
        embeddings = self.embed(pixels, np.stack([found.landmarks for found in detections]))
        return [
            DetectedFace(found, embedding, self.model) for found, embedding in zip(detections, embeddings, strict=True)
        ]

    def embed(self, pixels: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(N, 128) unit-length embeddings of the faces whose five landmarks (N, 5, 2) are given."""
        cv2 = self._cv2
        chips = [
            cv2.warpAffine(pixels, similarity_transform(points, TEMPLATE), (CHIP_SIZE, CHIP_SIZE))
            for points in np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
        ]
        if not chips:
            return np.empty((0, self.model.dimension), dtype=np.float32)
        # SFace takes RGB (OpenCV's own wrapper swaps its BGR input): the pixels already are.
        self._net.setInput(cv2.dnn.blobFromImages(chips, 1.0, (CHIP_SIZE, CHIP_SIZE), (0, 0, 0), False, False), "data")
        return self.model.normalized(self._net.forward())


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 rotation + uniform scale + shift that maps ``source`` points closest to ``target``
    (least squares; Umeyama's method, as OpenCV's alignCrop)."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    centred_source, centred_target = source - source_mean, target - target_mean
    covariance = centred_target.T @ centred_source / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, -1.0 if np.linalg.det(covariance) < 0 else 1.0])
    rotation = u @ sign @ vt
    scale = float((singular * np.diag(sign)).sum() / centred_source.var(axis=0).sum())
    transform = np.empty((2, 3))
    transform[:, :2] = scale * rotation
    transform[:, 2] = target_mean - scale * rotation @ source_mean
    return transform
