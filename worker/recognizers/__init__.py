"""Recognizers: one module per backend behind the small ``Recognizer`` protocol.

``local`` (dlib, offline, free) is the default; ``rekognition`` calls Amazon Rekognition. Both
return :class:`worker.results.RecognitionResult`. Backends are imported only when built, so a
producer or a Rekognition worker never imports dlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from worker.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from worker.images import LoadedImage
    from worker.results import RecognitionResult
    from worker.settings import Settings
    from worker.sources import S3Location

BACKENDS = ("local", "rekognition")
#: Backends whose calls are billed per image.
PAID_BACKENDS = frozenset({"rekognition"})


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

        return RekognitionRecognizer.from_settings(settings)
    raise ConfigurationError(f"unknown backend {settings.backend!r}; choose one of: {', '.join(BACKENDS)}")
