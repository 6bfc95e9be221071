"""The ``rekognition`` recognizer: Amazon Rekognition's RecognizeCelebrities, through boto3.

An image already in S3, in a format Rekognition reads (JPEG, PNG) and within its 15 MB limit, is
passed by reference (``S3Object``), so its bytes never travel through the worker. Anything else is
sent as bytes: the original when it fits (5 MB) and needs no EXIF rotation, otherwise the upright
pixels re-encoded as JPEG and shrunk to fit.
"""

from __future__ import annotations

from typing import Any

from worker.aws import AWS_ERRORS, client, translate
from worker.errors import ConfigurationError, ThrottledError
from worker.media.images import LoadedImage, encode_jpeg_within
from worker.recognition import RecognitionResult
from worker.settings import Settings
from worker.sources import S3Location

MAX_S3_OBJECT_BYTES = 15 * 1024 * 1024
MAX_BYTES = 5 * 1024 * 1024
DIRECT_FORMATS = frozenset({"JPEG", "PNG"})


RATE_LIMIT_KEY = "celebscan:rate:rekognition"


class RekognitionRecognizer:
    name = "rekognition"

    def __init__(self, rekognition_client, limiter=None) -> None:
        self.client = rekognition_client
        self.limiter = limiter

    @classmethod
    def from_settings(cls, settings: Settings) -> RekognitionRecognizer:
        return cls(client("rekognition", settings), _limiter(settings))

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        argument = image_argument(image, location)
        if self.limiter:
            self.limiter.acquire()
        try:
            response = self.client.recognize_celebrities(Image=argument)
        except AWS_ERRORS as exc:
            error = translate(exc, "RecognizeCelebrities")
            if self.limiter and isinstance(error, ThrottledError):
                self.limiter.penalize()
            raise error from exc
        return RecognitionResult.from_rekognition(response)


def image_argument(image: LoadedImage, location: S3Location | None) -> dict[str, Any]:
    """The ``Image`` parameter: an S3 reference when possible, else bytes within the limit."""
    as_stored = image.format in DIRECT_FORMATS and not image.rotated
    if location is not None and as_stored and location.size <= MAX_S3_OBJECT_BYTES:
        return {"S3Object": {"Bucket": location.bucket, "Name": location.key}}
    if as_stored and len(image.data) <= MAX_BYTES:
        return {"Bytes": image.data}
    return {"Bytes": encode_jpeg_within(image.pixels, MAX_BYTES)}


def _limiter(settings: Settings):
    """The shared pacing for ``CELEBSCAN_REKOGNITION_TPS``, or None when no rate is set."""
    if settings.rekognition_tps <= 0:
        return None
    url = settings.rate_limit_url or settings.broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            "CELEBSCAN_REKOGNITION_TPS needs Redis: set CELEBSCAN_RATE_LIMIT_URL or a Redis broker"
        )
    from worker.rate_limit import RedisRateLimiter

    # A quarter second of calls may go at once: a moment when no worker was ready is not lost, and
    # the service's own bucket (about one second of quota) still has room.
    rate = settings.rekognition_tps
    return RedisRateLimiter.from_url(url, RATE_LIMIT_KEY, rate, burst=max(1.0, rate / 4))
