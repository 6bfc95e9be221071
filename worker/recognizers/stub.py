"""A recognizer whose answers are chosen in advance, for tests and for measuring worker overhead."""

from __future__ import annotations

from collections.abc import Callable

from worker.media.images import LoadedImage
from worker.recognition import RecognitionResult
from worker.sources import S3Location


class StubRecognizer:
    """Answers every image with ``answer(image)``; the default finds nobody.

    ``answer`` may raise one of :mod:`worker.errors`' errors to act out a failing service.
    """

    name = "stub"

    def __init__(self, answer: Callable[[LoadedImage], RecognitionResult] | None = None) -> None:
        self.answer = answer or (lambda image: RecognitionResult())
        self.calls = 0

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        self.calls += 1
        return self.answer(image)
