"""The face prefilter: the free local detector decides which images are worth a paid call.

An image in which the local recognizer's own detector (YuNet, :mod:`worker.faces.detection`) finds no
face is recorded ``done`` with no faces and never sent to the paid recognizer (so never billed). It
needs only the detector (122 KB, ~20 ms an image), not the embedding model. What it misses and what
it saves is measured in ``bench/prefilter.py`` (docs/performance.md).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from worker.errors import ConfigurationError, RecognizerUnavailableError
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.faces.detection import FaceDetector


class FacePrefilter:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._detector: FaceDetector | None = None
        #: One detector per process: a run's calls in flight take turns at it.
        self._detecting = threading.Lock()

    def check_available(self) -> None:
        """Load the detector now; :class:`RecognizerUnavailableError` when this worker cannot."""
        if self._detector is None:  # loaded on first use: workers that never prefilter skip OpenCV
            from worker.faces.detection import FaceDetector

            try:
                self._detector = FaceDetector.from_settings(self.settings)
            except ConfigurationError as exc:
                raise RecognizerUnavailableError(f"this worker cannot run the face prefilter: {exc}") from exc

    def has_face(self, pixels: np.ndarray) -> bool:
        with self._detecting:
            self.check_available()
            assert self._detector is not None
            return bool(self._detector.detect(pixels))
