"""Rekognition Video's celebrity recognition, through boto3: what it takes, starting a job, reading
its results, and its completion messages.

``StartCelebrityRecognition`` reads a video in place from S3 and runs asynchronously; the same
``ClientRequestToken`` returns the same JobId, so a start repeated after a crash starts (and bills)
nothing new. ``GetCelebrityRecognition`` answers IN_PROGRESS until the job ends, then pages of
``{Timestamp, Celebrity}``. A job's end is also published to an SNS topic when the start names one
(``NotificationChannel``). The code path is the one that talks to AWS; only the endpoint and the
credentials differ in the tests (``tests/rekognition_video_standin.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from worker.aws import AWS_ERRORS, translate
from worker.errors import PermanentError, ThrottledError, VideoOverLimitsError
from worker.media.video import VideoInfo
from worker.recognition import BoundingBox

#: What Rekognition Video takes (its API reference: Video, VideoTooLargeException; its FAQ: H.264).
FORMATS = frozenset({"mp4", "mov", "avi"})
CODECS = frozenset({"h264"})
MAX_BYTES = 10 * 1024**3
MAX_DURATION_MS = 6 * 3600 * 1000
#: A page of results: the service's largest.
PAGE_SIZE = 1000


def check_where(size: int, in_s3: bool) -> None:
    """The limits known from the listing alone: a video in S3, at most 10 GB (nothing read yet)."""
    if not in_s3:
        raise VideoOverLimitsError(
            "Rekognition Video reads videos from S3 only: scan this folder with --backend local, or upload it",
            code="VideoNotInS3",
        )
    if size > MAX_BYTES:
        raise VideoOverLimitsError(f"the video is {size:,} bytes; Rekognition Video takes 10 GB", code="VideoTooLarge")


def check_limits(info: VideoInfo, size: int, in_s3: bool) -> None:
    """Raise :class:`VideoOverLimitsError` (its code names the limit) for a video Rekognition Video
    would refuse, before any call is made."""
    check_where(size, in_s3)
    if info.format not in FORMATS:
        raise VideoOverLimitsError(
            f"a {info.format} video; Rekognition Video reads MP4, MOV and AVI", code="UnsupportedVideoFormat"
        )
    if info.codec not in CODECS:
        raise VideoOverLimitsError(
            f"the video is coded with {info.codec or 'an unnamed codec'}; Rekognition Video reads H.264",
            code="UnsupportedVideoCodec",
        )
    if info.duration_ms is not None and info.duration_ms > MAX_DURATION_MS:
        raise VideoOverLimitsError(
            f"the video lasts {info.duration_ms / 3_600_000:.1f} hours; Rekognition Video takes 6", code="VideoTooLong"
        )


def request_token(content_key: str, size: int, bucket: str, key: str, generation: int) -> str:
    """The ``ClientRequestToken`` of a job: derived from the video's identity (its bytes, where the
    job reads them, and the job's generation), so every start of that job sends the same one."""
    identity = json.dumps([content_key, size, bucket, key, generation])
    return hashlib.sha256(identity.encode()).hexdigest()[:64]


@dataclass(frozen=True)
class Detection:
    """A person seen at one moment of a video: the unit appearances are merged from."""

    timestamp_ms: int
    name: str
    person_id: str | None
    confidence: float
    box: BoundingBox
    urls: tuple[str, ...] = ()
    known_gender: str | None = None


@dataclass(frozen=True)
class JobState:
    """What ``GetCelebrityRecognition`` said of a job."""

    status: str  # IN_PROGRESS, SUCCEEDED, FAILED
    message: str = ""
    duration_ms: int | None = None
    width: int | None = None
    height: int | None = None


class RekognitionVideo:
    """Starts celebrity recognition jobs and reads them, through one boto3 client."""

    def __init__(self, rekognition_client, notification_channel: Mapping[str, str] | None = None) -> None:
        self.client = rekognition_client
        self.notification_channel = dict(notification_channel) if notification_channel else None

    def start(self, bucket: str, key: str, token: str, tag: str = "") -> str:
        """Start (or find again, by ``token``) the job on s3://bucket/key; its JobId.

        Raises :class:`ThrottledError` with code ``LimitExceededException`` when the account's
        concurrent jobs are at its quota, and the translated error for anything else.
        """
        arguments: dict[str, Any] = {
            "Video": {"S3Object": {"Bucket": bucket, "Name": key}},
            "ClientRequestToken": token,
        }
        if tag:
            arguments["JobTag"] = tag
        if self.notification_channel:
            arguments["NotificationChannel"] = self.notification_channel
        try:
            return self.client.start_celebrity_recognition(**arguments)["JobId"]
        except AWS_ERRORS as exc:
            raise _translated(exc, "StartCelebrityRecognition") from exc

    def state(self, job_id: str) -> JobState:
        """The job's status (one small page: the results are read by :meth:`detections`)."""
        return _job_state(self._page(job_id, max_results=1))

    def detections(self, job_id: str) -> Iterator[Detection]:
        """Every detection of a finished job, page after page, in time order."""
        token = None
        while True:
            page = self._page(job_id, PAGE_SIZE, token)
            for item in page.get("Celebrities", ()):
                yield detection(item)
            token = page.get("NextToken")
            if not token:
                return

    def _page(self, job_id: str, max_results: int, next_token: str | None = None) -> dict:
        arguments: dict[str, Any] = {"JobId": job_id, "MaxResults": max_results, "SortBy": "TIMESTAMP"}
        if next_token:
            arguments["NextToken"] = next_token
        try:
            return self.client.get_celebrity_recognition(**arguments)
        except AWS_ERRORS as exc:
            raise _translated(exc, "GetCelebrityRecognition") from exc


def _translated(exc, what: str):
    error = translate(exc, what)
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code == "VideoTooLargeException":
        return VideoOverLimitsError(str(error), code="VideoTooLarge")
    if code == "ResourceNotFoundException":  # a job older than the service keeps (7 days)
        return PermanentError(str(error), code="VideoJobNotFound")
    if code == "LimitExceededException":
        return ThrottledError(str(error), code="LimitExceededException")
    return error


def _job_state(page: Mapping[str, Any]) -> JobState:
    metadata = page.get("VideoMetadata") or {}
    return JobState(
        status=page.get("JobStatus", "IN_PROGRESS"),
        message=page.get("StatusMessage", "") or "",
        duration_ms=metadata.get("DurationMillis"),
        width=metadata.get("FrameWidth"),
        height=metadata.get("FrameHeight"),
    )


def detection(item: Mapping[str, Any]) -> Detection:
    """One ``{Timestamp, Celebrity}`` of a GetCelebrityRecognition page."""
    celebrity = item["Celebrity"]
    box = celebrity.get("BoundingBox") or (celebrity.get("Face") or {}).get("BoundingBox") or {}
    return Detection(
        timestamp_ms=int(item["Timestamp"]),
        name=celebrity["Name"],
        person_id=celebrity.get("Id") or None,
        confidence=float(celebrity.get("Confidence", 0.0)),
        box=BoundingBox.from_rekognition({"Left": 0, "Top": 0, "Width": 0, "Height": 0, **box}),
        urls=tuple(celebrity.get("Urls", ())),
        known_gender=(celebrity.get("KnownGender") or {}).get("Type"),
    )


def completion(body: str) -> tuple[str, str] | None:
    """(JobId, Status) of a completion message read from SQS: Rekognition's notification, as SNS
    delivers it (its envelope's ``Message``) or raw; None for anything else (SQS's test message)."""
    try:
        message = json.loads(body)
        if isinstance(message, dict) and isinstance(message.get("Message"), str) and "JobId" not in message:
            message = json.loads(message["Message"])
    except ValueError:
        return None
    if not isinstance(message, dict) or not message.get("JobId"):
        return None
    return str(message["JobId"]), str(message.get("Status", ""))
