"""The ``rekognition`` recognizer: Amazon Rekognition's RecognizeCelebrities, through boto3.

An image already in S3, in a format Rekognition reads (JPEG, PNG) and within its 15 MB limit, is
passed by reference (``S3Object``), so its bytes never travel through the worker. Anything else is
sent as bytes: the original when it fits (5 MB) and needs no EXIF rotation, otherwise the upright
pixels re-encoded as JPEG and shrunk to fit.
"""

from __future__ import annotations

from typing import Any

from worker.aws import AWS_ERRORS, client, translate
from worker.images import LoadedImage, encode_jpeg_within
from worker.results import RecognitionResult
from worker.settings import Settings
from worker.sources import S3Location

MAX_S3_OBJECT_BYTES = 15 * 1024 * 1024
MAX_BYTES = 5 * 1024 * 1024
DIRECT_FORMATS = frozenset({"JPEG", "PNG"})


class RekognitionRecognizer:
    name = "rekognition"

    def __init__(self, rekognition_client) -> None:
        self.client = rekognition_client

    @classmethod
    def from_settings(cls, settings: Settings) -> RekognitionRecognizer:
        return cls(client("rekognition", settings))

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        try:
            response = self.client.recognize_celebrities(Image=image_argument(image, location))
        except AWS_ERRORS as exc:
            raise translate(exc, "RecognizeCelebrities") from exc
        return RecognitionResult.from_rekognition(response)


def image_argument(image: LoadedImage, location: S3Location | None) -> dict[str, Any]:
    """The ``Image`` parameter: an S3 reference when possible, else bytes within the limit."""
    as_stored = image.format in DIRECT_FORMATS and not image.rotated
    if location is not None and as_stored and location.size <= MAX_S3_OBJECT_BYTES:
        return {"S3Object": {"Bucket": location.bucket, "Name": location.key}}
    if as_stored and len(image.data) <= MAX_BYTES:
        return {"Bytes": image.data}
    return {"Bytes": encode_jpeg_within(image.pixels, MAX_BYTES)}
