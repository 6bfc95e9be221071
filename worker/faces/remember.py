"""Faces remembered from a recognizer that keeps none: an embedding made locally at each face.

Rekognition returns a box and five landmarks for every face, named or not, but no vector. The
wrapper embeds each face with the current model (:mod:`worker.faces.models`, SFace) aligned on
Rekognition's own landmarks, mapped to the five points SFace's alignment takes: no detection and
no call, ~18 ms of CPU a face (SFace's network). A face that came back without them is found again
by YuNet in its box (:meth:`worker.faces.detection.FaceDetector.landmarks_at`, ~32 ms); a box in
which YuNet finds no face keeps no embedding. The face keeps the name Rekognition gave it; the
vector is what later enrolling, ``find`` and the unknown groups compare.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from worker.faces.embeddings import FaceEmbedder
from worker.media.images import LoadedImage
from worker.recognition import BoundingBox, Celebrity, RecognitionResult, UnrecognizedFace
from worker.recognizers import Recognizer
from worker.sources import S3Location

#: Rekognition's landmark types for SFace's five points: the eyes, the nose tip, the mouth's corners.
EYES = ("eyeLeft", "eyeRight")
NOSE = "nose"
MOUTH = ("mouthLeft", "mouthRight")


class RememberingRecognizer:
    """A recognizer whose results come back with an embedding for every face.

    One embedder per process, shared by a run's threads (its calls in flight): they take turns at
    it, as OpenCV's networks are neither shareable between threads nor worth threading here.
    """

    def __init__(self, recognizer: Recognizer, embedder: FaceEmbedder) -> None:
        self.name = recognizer.name
        #: The recognizer wrapped: what calls a service for what has no faces to remember (a video's job).
        self.wrapped = recognizer
        self._embedder = embedder
        self._turn = threading.Lock()

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        result = self.wrapped.recognize(image, location)
        with self._turn:
            return with_embeddings(result, image, self._embedder)


def with_embeddings(result: RecognitionResult, image: LoadedImage, embedder: FaceEmbedder) -> RecognitionResult:
    """``result`` with each face's embedding made at its landmarks (a face whose landmarks are
    neither given nor found keeps none)."""
    points = {i: _points_of(face, image, embedder) for i, face in enumerate(result.faces)}
    usable = {i: found for i, found in points.items() if found is not None}
    model = embedder.model
    embedding: dict[int, bytes] = {}
    if usable:
        vectors = embedder.embed(image.pixels, np.stack(list(usable.values())))
        embedding = {i: model.pack(vector) for i, vector in zip(usable, vectors, strict=True)}
    named = len(result.celebrities)
    return dataclasses.replace(
        result,
        celebrities=tuple(
            dataclasses.replace(face, embedding=embedding.get(i)) for i, face in enumerate(result.celebrities)
        ),
        unrecognized_faces=tuple(
            dataclasses.replace(face, embedding=embedding.get(named + i))
            for i, face in enumerate(result.unrecognized_faces)
        ),
        embedding_model=model.id,
    )


def rekognition_points(landmarks: Iterable[Mapping[str, Any]], width: int, height: int) -> np.ndarray | None:
    """Rekognition's landmarks (ratios of the image) as the (5, 2) pixels SFace aligns on: the eye on
    the image's left, the other eye, the nose tip, the mouth's corner on the image's left, the other.

    The eyes and the mouth's corners are each sorted by x rather than taken by their names, which
    do not say whose left they mean; None unless all five are given.
    """
    found = {}
    for mark in landmarks:
        x, y = mark.get("X"), mark.get("Y")
        if isinstance(x, int | float) and isinstance(y, int | float):
            found[mark.get("Type")] = (float(x) * width, float(y) * height)
    if not all(kind in found for kind in (*EYES, NOSE, *MOUTH)):
        return None
    eyes = sorted(found[kind] for kind in EYES)
    mouth = sorted(found[kind] for kind in MOUTH)
    return np.array([*eyes, found[NOSE], *mouth], dtype=np.float64)


def _points_of(face: Celebrity | UnrecognizedFace, image: LoadedImage, embedder: FaceEmbedder) -> np.ndarray | None:
    raw = face.raw.get("Face", {}) if isinstance(face, Celebrity) else face.raw
    given = rekognition_points(raw.get("Landmarks") or (), image.width, image.height)
    if given is not None:
        return given
    box = _pixel_box(face.bounding_box, image.width, image.height)
    return None if box is None else embedder.detector.landmarks_at(image.pixels, box)


def _pixel_box(box: BoundingBox, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A ratio box (which Rekognition lets reach past the image's edges) in pixels, clipped."""
    left, top = max(0, round(box.left * width)), max(0, round(box.top * height))
    right = min(width, round((box.left + box.width) * width))
    bottom = min(height, round((box.top + box.height) * height))
    return (left, top, right, bottom) if right - left >= 2 and bottom - top >= 2 else None
