"""The face prefilter: the free local detector decides which images are worth a paid call.

An image in which dlib's detector finds no face is recorded ``done`` with no faces and never sent
to the paid recognizer (so never billed). The detector misses some faces the service would find
(small, turned or half-hidden ones): measured in ``bench/prefilter.py`` and the README.
"""

from __future__ import annotations

import numpy as np

from worker.settings import Settings


class FacePrefilter:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._embedder = None

    def has_face(self, pixels: np.ndarray) -> bool:
        if self._embedder is None:  # dlib's models load on first use: Rekognition-only workers skip them
            from worker.face_embeddings import FaceEmbedder

            self._embedder = FaceEmbedder.from_settings(self.settings)
        return bool(self._embedder.detect(pixels))
