"""The ``local`` recognizer: YuNet faces with SFace embeddings, matched against the enrolled gallery.

Offline and free. Only gallery embeddings of the embedder's own model are compared (the index
holds no others).
"""

from __future__ import annotations

from sqlalchemy import Engine

from worker.faces.embeddings import DetectedFace, FaceEmbedder
from worker.faces.gallery import Gallery, GalleryIndex
from worker.media.images import LoadedImage
from worker.recognition import BoundingBox, Celebrity, RecognitionResult, UnrecognizedFace
from worker.settings import Settings
from worker.sources import S3Location


def match_confidence(distance: float, threshold: float) -> float:
    """Distance to Rekognition's 0–100 scale: 100 at distance 0, 50 at the threshold, 0 at twice it."""
    return max(0.0, min(100.0, 100.0 - 50.0 * distance / threshold))


class LocalRecognizer:
    name = "local"

    def __init__(
        self,
        embedder: FaceEmbedder,
        gallery: GalleryIndex,
        threshold: float | None = None,
        keep_embeddings: bool = True,
    ) -> None:
        if gallery.model != embedder.model:
            raise ValueError(f"a gallery of {gallery.model.id} embeddings cannot match {embedder.model.id} faces")
        self.embedder = embedder
        self.gallery = gallery
        self.threshold = threshold or embedder.model.threshold
        self.keep_embeddings = keep_embeddings

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> LocalRecognizer:
        embedder = FaceEmbedder.from_settings(settings)
        return cls(
            embedder, Gallery(engine).index(embedder.model), settings.match_threshold, settings.keep_face_embeddings
        )

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        celebrities, unrecognized = [], []
        for face in self.embedder.faces(image.pixels):
            found = face.detection
            box = BoundingBox.from_pixels(
                round(found.left), round(found.top), round(found.right), round(found.bottom), image.width, image.height
            )
            match = self.gallery.nearest(face.embedding)
            details: dict[str, object] = {"DetectorScore": round(found.score, 4), "EmbeddingModel": face.model.id}
            embedding = face.model.pack(face.embedding) if self.keep_embeddings else None
            if match is not None:
                details["NearestDistance"] = round(match[1], 4)
            if match is not None and match[1] <= self.threshold:
                celebrities.append(self._celebrity(face, box, *match, details, embedding))
            else:
                unrecognized.append(
                    UnrecognizedFace(bounding_box=box, confidence=face.confidence, raw=details, embedding=embedding)
                )
        return RecognitionResult(
            celebrities=tuple(celebrities),
            unrecognized_faces=tuple(unrecognized),
            embedding_model=self.embedder.model.id if self.keep_embeddings else None,
        )

    def _celebrity(
        self, face: DetectedFace, box: BoundingBox, person: int, distance: float, details: dict, embedding: bytes | None
    ) -> Celebrity:
        return Celebrity(
            name=self.gallery.names[person],
            id=self.gallery.person_ids[person],
            match_confidence=match_confidence(distance, self.threshold),
            bounding_box=box,
            face_confidence=face.confidence,
            urls=self.gallery.urls[person],
            raw=details,
            embedding=embedding,
            from_gallery=True,
        )
