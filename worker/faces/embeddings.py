"""dlib face detection and 128-d embeddings, as plain data.

A small face API in the spirit of ``face_recognition``, without its globals: a ``FaceEmbedder`` loads
the three dlib models once when it is built (one per process) and turns an RGB array into
``DetectedFace`` records. dlib is imported lazily so that the producer and the Rekognition backend
never need it.

Speed choices: detection runs on a copy downscaled to ``detect_max_side`` (the HOG detector's cost
grows with pixels, and faces in large photos are large), small images are upsampled so faces down
to ~20 px are found, and landmarks and embeddings are computed on the original pixels, where the
150x150 aligned chip keeps full detail. The embedding network itself runs in numpy
(:mod:`worker.faces.net`, same weights and same numbers as dlib's, ~5x faster without BLAS in dlib).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from worker.errors import MissingDependencyError
from worker.faces.net import CHIP_PADDING, CHIP_SIZE, FaceDescriptorNet
from worker.settings import Settings

log = logging.getLogger(__name__)

EMBEDDING_SIZE = 128
LANDMARKS_MODEL = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_HINT = "pip install '.[local]' in a clone of celebscan"


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

    def __init__(self, *, detect_max_side: int = 1024, min_score: float = 0.2, cache_dir: str | Path = "") -> None:
        dlib, threadpoolctl = _import_dlib()
        self._dlib = dlib
        self._detector = _load_detector(dlib, Path(cache_dir).expanduser() if cache_dir else None)
        self._landmarks = dlib.shape_predictor(str(model_file(LANDMARKS_MODEL)))
        self._descriptor_net = FaceDescriptorNet(model_file(DESCRIPTOR_MODEL))
        # One BLAS thread: a scan runs one process per core, and the network's matrices are too
        # small for threads to pay (measured: 2 threads were slower than 1 on 2 cores).
        threadpoolctl.threadpool_limits(limits=1, user_api="blas")
        self.detect_max_side = detect_max_side
        self.min_score = min_score

    @classmethod
    def from_settings(cls, settings: Settings) -> FaceEmbedder:
        return cls(
            detect_max_side=settings.detect_max_side, min_score=settings.min_face_score, cache_dir=settings.cache_dir
        )

    def detect(self, pixels: np.ndarray) -> list[tuple[Any, float]]:
        """(dlib rectangle in ``pixels``' coordinates, detector score) of every face, strongest first.

        Detection alone, without embeddings: what the face prefilter needs (~0.1 s an image).
        """
        pixels = np.ascontiguousarray(pixels)
        height, width = pixels.shape[:2]
        scale = min(1.0, self.detect_max_side / max(height, width))
        small = pixels if scale == 1.0 else _resize(pixels, scale)
        rects, scores, _ = self._detector.run(small, _upsample_times(small), self.min_score)
        return [
            (
                self._dlib.rectangle(
                    round(rect.left() / scale),
                    round(rect.top() / scale),
                    round(rect.right() / scale),
                    round(rect.bottom() / scale),
                ),
                float(score),
            )
            for rect, score in sorted(zip(rects, scores, strict=True), key=lambda pair: -pair[1])
        ]

    def faces(self, pixels: np.ndarray) -> list[DetectedFace]:
        """Every face in an upright RGB ``uint8`` array, strongest detection first."""
        pixels = np.ascontiguousarray(pixels)
        detections = self.detect(pixels)
        if not detections:
            return []
        embeddings = self._embed_rectangles(pixels, [box for box, _ in detections])
        return [
            DetectedFace(box.left(), box.top(), box.right(), box.bottom(), float(score), embedding)
            for (box, score), embedding in zip(detections, embeddings, strict=True)
        ]

    def embed_at(self, pixels: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        """(N, 128) embeddings of the faces at pixel boxes ``(left, top, right, bottom)`` found by
        another detector (Rekognition's): landmarks and the aligned chip from the box, no detection."""
        if not boxes:
            return np.empty((0, EMBEDDING_SIZE))
        pixels = np.ascontiguousarray(pixels)
        return self._embed_rectangles(pixels, [self._dlib.rectangle(*box) for box in boxes])

    def _embed_rectangles(self, pixels: np.ndarray, rectangles: list) -> np.ndarray:
        shapes = self._dlib.full_object_detections()
        shapes.extend(self._landmarks(pixels, box) for box in rectangles)
        chips = self._dlib.get_face_chips(pixels, shapes, size=CHIP_SIZE, padding=CHIP_PADDING)
        return self._descriptor_net.descriptors(np.stack(chips))


def _load_detector(dlib, cache_dir: Path | None):
    """dlib's frontal face detector, from the cache when it is there.

    ``get_frontal_face_detector()`` parses the model from text, 0.6 s in every process that starts;
    dlib's binary form of the same detector loads in ~2 ms. The cache file is named after dlib's
    version and written atomically, so processes starting together never read half a file. A
    cache that cannot be read or written only costs the 0.6 s.
    """
    cached = cache_dir / f"frontal_face_detector-dlib-{dlib.__version__}.svm" if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            return dlib.fhog_object_detector(str(cached))
        except RuntimeError:
            log.warning("ignoring the unreadable detector cache %s", cached)
    detector = dlib.get_frontal_face_detector()
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".part", delete=False) as part:
                detector.save(part.name)
            os.replace(part.name, cached)
        except OSError as exc:
            log.debug("cannot cache the face detector in %s: %s", cache_dir, exc)
    return detector


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
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def model_file(name: str) -> Path:
    """A model file of the ``face-recognition-models`` package, found without importing the package
    (its ``__init__`` imports the deprecated ``pkg_resources``: 0.3 s in every worker process)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face_recognition_models is not installed", name="face_recognition_models")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / name


def _import_dlib():
    try:
        import dlib
        import threadpoolctl

        model_file(DESCRIPTOR_MODEL)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the local recognizer needs dlib, its models and threadpoolctl ({exc.name} is missing): {INSTALL_HINT}"
        ) from exc
    return dlib, threadpoolctl
