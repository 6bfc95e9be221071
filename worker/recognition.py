"""The one result type every recognizer returns, in Amazon Rekognition's RecognizeCelebrities shape.

Bounding boxes are ratios of the image's width and height, as Rekognition gives them; confidences
are on a 0–100 scale. ``from_rekognition`` is the only place a vendor response is turned into these
types, and ``raw`` keeps every field of the vendor's face record (landmarks, pose, quality, emotions)
so nothing the service returned is lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BoundingBox:
    left: float
    top: float
    width: float
    height: float

    @classmethod
    def from_pixels(
        cls, left: int, top: int, right: int, bottom: int, image_width: int, image_height: int
    ) -> BoundingBox:
        """Clip a pixel rectangle to the image and express it as ratios."""
        left, right = max(0, left), min(image_width, right)
        top, bottom = max(0, top), min(image_height, bottom)
        return cls(
            left=left / image_width,
            top=top / image_height,
            width=max(0, right - left) / image_width,
            height=max(0, bottom - top) / image_height,
        )

    @classmethod
    def from_rekognition(cls, box: Mapping[str, float]) -> BoundingBox:
        return cls(left=box["Left"], top=box["Top"], width=box["Width"], height=box["Height"])

    def to_dict(self) -> dict[str, float]:
        return {
            "left": round(self.left, 4),
            "top": round(self.top, 4),
            "width": round(self.width, 4),
            "height": round(self.height, 4),
        }


@dataclass(frozen=True)
class Celebrity:
    """A recognized face."""

    name: str
    id: str
    match_confidence: float
    bounding_box: BoundingBox
    face_confidence: float | None = None
    urls: tuple[str, ...] = ()
    known_gender: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: The face's embedding as stored (float16: ``EmbeddingModel.pack``), or None when none is kept.
    embedding: bytes | None = field(default=None, compare=False, repr=False)
    #: Named by the enrolled gallery (the local recognizer), not by a paid recognizer: the gallery
    #: may take the name back (the person removed) or give another.
    from_gallery: bool = False


@dataclass(frozen=True)
class UnrecognizedFace:
    """A face that matched nobody."""

    bounding_box: BoundingBox
    confidence: float
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    embedding: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RecognitionResult:
    celebrities: tuple[Celebrity, ...] = ()
    unrecognized_faces: tuple[UnrecognizedFace, ...] = ()
    #: The id of the model that made the faces' embeddings (None: no embedding kept).
    embedding_model: str | None = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.celebrities]

    @classmethod
    def from_rekognition(cls, response: Mapping[str, Any]) -> RecognitionResult:
        """Turn a RecognizeCelebrities response into the result type, keeping every field."""
        celebrities = tuple(
            Celebrity(
                name=c["Name"],
                id=c.get("Id", ""),
                match_confidence=float(c.get("MatchConfidence", 0.0)),
                bounding_box=BoundingBox.from_rekognition(c["Face"]["BoundingBox"]),
                face_confidence=c["Face"].get("Confidence"),
                urls=tuple(c.get("Urls", ())),
                known_gender=(c.get("KnownGender") or {}).get("Type"),
                raw=c,
            )
            for c in response.get("CelebrityFaces", ())
        )
        unrecognized = tuple(
            UnrecognizedFace(
                bounding_box=BoundingBox.from_rekognition(f["BoundingBox"]),
                confidence=float(f.get("Confidence", 0.0)),
                raw=f,
            )
            for f in response.get("UnrecognizedFaces", ())
        )
        return cls(celebrities=celebrities, unrecognized_faces=unrecognized)

    @property
    def faces(self) -> tuple[Celebrity | UnrecognizedFace, ...]:
        """Every face, in the order they are stored (the named first)."""
        return (*self.celebrities, *self.unrecognized_faces)
