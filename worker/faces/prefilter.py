"""The face prefilter: the free local detector decides which images are worth a paid call.

An image in which dlib's detector finds no face is recorded ``done`` with no faces and never sent
to the paid recognizer (so never billed). The detector misses some faces the service would find
(small, turned or half-hidden ones): measured in ``bench/prefilter.py`` (docs/performance.md).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from worker.errors import ConfigurationError, RecognizerUnavailableError
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.faces.embeddings import FaceEmbedder


class FacePrefilter:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._embedder: FaceEmbedder | None = None
        #: dlib's detector is CPU work under the GIL: a run's calls in flight take turns at it.
        self._detecting = threading.Lock()

    def check_available(self) -> None:
        """Load dlib's detector now; :class:`RecognizerUnavailableError` when this worker cannot."""
        if self._embedder is None:  # dlib's models load on first use: Rekognition-only workers skip them
            from worker.faces.embeddings import FaceEmbedder

            try:
                self._embedder = FaceEmbedder.from_settings(self.settings)
            except ConfigurationError as exc:
                raise RecognizerUnavailableError(f"this worker cannot run the face prefilter: {exc}") from exc

    def has_face(self, pixels: np.ndarray) -> bool:
        with self._detecting:
            self.check_available()
            assert self._embedder is not None
            return bool(self._embedder.detect(pixels))
