"""Recognizers: one module per backend behind the small ``Recognizer`` protocol.

``local`` (YuNet and SFace on OpenCV, offline, free) is the default; ``rekognition`` calls Amazon
Rekognition. Both return :class:`worker.recognition.RecognitionResult`. Backends are imported only
when built, so a producer never imports OpenCV, nor does a Rekognition worker that keeps no face
embeddings (``CELEBSCAN_KEEP_FACE_EMBEDDINGS=false``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from worker.backends import BACKENDS, PAID_BACKENDS
from worker.errors import ConfigurationError, RecognizerUnavailableError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from worker.media.images import LoadedImage
    from worker.recognition import RecognitionResult
    from worker.settings import Settings
    from worker.sources import S3Location

__all__ = ["BACKENDS", "PAID_BACKENDS", "Recognizer", "Recognizers", "build_recognizer"]


class Recognizer(Protocol):
    name: str  # one of BACKENDS (or "stub" in tests); in PAID_BACKENDS when each call is billed

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        """Who is in ``image``; ``location`` is where it lives when it is in S3."""
        ...


def build_recognizer(settings: Settings, engine: Engine) -> Recognizer:
    """The recognizer named by ``settings.backend``, with its models or clients loaded."""
    if settings.backend == "local":
        from worker.recognizers.local import LocalRecognizer

        return LocalRecognizer.from_settings(settings, engine)
    if settings.backend == "rekognition":
        from worker.recognizers.rekognition import RekognitionRecognizer

        recognizer = RekognitionRecognizer.from_settings(settings)
        if not settings.keep_face_embeddings:
            return recognizer
        from worker.faces.embeddings import FaceEmbedder
        from worker.faces.remember import RememberingRecognizer

        return RememberingRecognizer(recognizer, FaceEmbedder.from_settings(settings))
    raise ConfigurationError(f"unknown backend {settings.backend!r}; choose one of: {', '.join(BACKENDS)}")


class Recognizers:
    """A worker process's recognizers by backend, each built the first time a batch asks for it.

    The scan decides the recognizer, so any worker serves any scan: a fleet can run a ``local``
    scan and a ``rekognition`` scan at once. A backend this process cannot build (the ``local``
    extra missing, say) raises :class:`RecognizerUnavailableError`, which hands the batch back
    rather than failing its images.
    """

    def __init__(
        self, settings: Settings | None, engine: Engine | None = None, built: dict[str, Recognizer] | None = None
    ) -> None:
        self._settings, self._engine = settings, engine
        self._built: dict[str, Recognizer] = dict(built or {})

    @classmethod
    def of(cls, *recognizers: Recognizer) -> Recognizers:
        """Exactly these recognizers and no others (tests and benchmarks)."""
        return cls(None, built={recognizer.name: recognizer for recognizer in recognizers})

    def get(self, backend: str) -> Recognizer:
        if backend not in self._built:
            if self._settings is None or self._engine is None:
                raise RecognizerUnavailableError(f"this worker runs only {', '.join(self._built)}, not {backend}")
            try:
                self._built[backend] = build_recognizer(self._settings.replace(backend=backend), self._engine)
            except ConfigurationError as exc:
                raise RecognizerUnavailableError(f"this worker cannot run the {backend} recognizer: {exc}") from exc
        return self._built[backend]
