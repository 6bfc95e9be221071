"""The face prefilter: the free local detector decides which images are worth a paid call.

An image in which dlib's detector finds no face is recorded ``done`` with no faces and never sent
to the paid recognizer (so never billed). The detector misses some faces the service would find
(small, turned or half-hidden ones): measured in ``bench/prefilter.py`` and the README.
"""

from __future__ import annotations

import numpy as np


class FacePrefilter:
    def __init__(self, *, detect_max_side: int = 1024, min_score: float = 0.2) -> None:
        self.detect_max_side, self.min_score = detect_max_side, min_score
        self._embedder = None

    def has_face(self, pixels: np.ndarray) -> bool:
        if self._embedder is None:  # dlib's models load on first use: Rekognition-only workers skip them
            from worker.face_embeddings import FaceEmbedder

            self._embedder = FaceEmbedder(detect_max_side=self.detect_max_side, min_score=self.min_score)
        return bool(self._embedder.detect(pixels))
