"""Faces remembered from a recognizer that keeps none: an embedding made locally at each face's box.

Rekognition returns a box (and five landmarks) for every face, named or not, but no vector. The
wrapper embeds each face at its box with the current model (``worker/faces/encoder.py``): dlib's
landmarks and aligned chip from the box, no detection, ~25 ms a face and no call. The face keeps
the name Rekognition gave it; the vector is what later enrolling, ``find`` and the unknown groups
compare.
"""

from __future__ import annotations

import dataclasses

from worker.faces.encoder import FaceEncoder, pack
from worker.media.images import LoadedImage
from worker.recognition import BoundingBox, RecognitionResult
from worker.recognizers import Recognizer
from worker.sources import S3Location


class RememberingRecognizer:
    """A recognizer whose results come back with an embedding for every face."""

    def __init__(self, recognizer: Recognizer, encoder: FaceEncoder) -> None:
        self.name = recognizer.name
        self._recognizer = recognizer
        self._encoder = encoder

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        return with_embeddings(self._recognizer.recognize(image, location), image, self._encoder)


def with_embeddings(result: RecognitionResult, image: LoadedImage, encoder: FaceEncoder) -> RecognitionResult:
    """``result`` with each face's embedding made at its box (a box with no pixels in the image keeps none)."""
    faces = result.faces
    boxes = [_pixel_box(face.bounding_box, image.width, image.height) for face in faces]
    usable = [i for i, box in enumerate(boxes) if box is not None]
    if not usable:
        return dataclasses.replace(result, embedding_model=encoder.model.id)
    vectors = encoder.embed_at(image.pixels, [boxes[i] for i in usable])  # type: ignore[misc]
    embedding: dict[int, bytes] = {i: pack(vector) for i, vector in zip(usable, vectors, strict=True)}
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
        embedding_model=encoder.model.id,
    )


def _pixel_box(box: BoundingBox, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A ratio box (which Rekognition lets reach past the image's edges) in pixels, clipped."""
    left, top = max(0, round(box.left * width)), max(0, round(box.top * height))
    right = min(width, round((box.left + box.width) * width))
    bottom = min(height, round((box.top + box.height) * height))
    return (left, top, right, bottom) if right - left >= 2 and bottom - top >= 2 else None
