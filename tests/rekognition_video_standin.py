"""Rekognition Video's celebrity recognition, stood in for over HTTP (moto has none).

It answers ``RekognitionService.StartCelebrityRecognition`` and ``GetCelebrityRecognition`` in the
service's JSON protocol, plugged into the image stand-in's server (``tests/rekognition_standin.py``:
one endpoint, as AWS has), so the worker's real boto3 code runs unchanged against it. Like the
real service it:

- reads the video in place from S3 (moto's server): a missing object is ``InvalidS3ObjectException``,
  a video that is not H.264 in MP4/MOV/AVI ends ``FAILED``;
- returns the same JobId for the same ``ClientRequestToken`` (and ``IdempotentParameterMismatch``
  when the token comes back with another video), and refuses a start beyond its quota of jobs in
  progress with ``LimitExceededException``;
- runs each job for ``job_seconds`` (the tests and benchmarks scale it down), then answers pages of
  ``{Timestamp, Celebrity}`` sorted by TIMESTAMP or ID, with ``NextToken``;
- publishes each job's end to the SNS topic its start named (moto delivers it to the SQS queue
  subscribed there), unless the test loses that message on purpose.

The test chooses each video's detections and which jobs fail; every start is recorded, so a test
can count jobs started twice, and the jobs in progress over time (the benchmark's figure).
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import boto3

from worker.media.video import BytesRanges, probe

START = "RekognitionService.StartCelebrityRecognition"
GET = "RekognitionService.GetCelebrityRecognition"
TARGETS = frozenset({START, GET})


class VideoServiceError(Exception):
    def __init__(self, error_type: str, message: str = "", status: int = 400) -> None:
        super().__init__(message or error_type)
        self.status, self.error_type = status, error_type


def detection(seconds: float, name: str, *, confidence: float = 97.0, left: float = 0.3) -> dict:
    """A ``{Timestamp, Celebrity}`` item with the fields the real service returns."""
    box = {"Width": 0.2, "Height": 0.3, "Left": left, "Top": 0.2}
    return {
        "Timestamp": round(seconds * 1000),
        "Celebrity": {
            "Urls": [f"www.wikidata.org/wiki/{name}"],
            "Name": name,
            "Id": f"id-{name}",
            "Confidence": confidence,
            "BoundingBox": box,
            "Face": {"BoundingBox": box, "Confidence": 99.9},
            "KnownGender": {"Type": "Male"},
        },
    }


@dataclass
class VideoJob:
    job_id: str
    token: str | None
    bucket: str
    key: str
    started_at: float
    ends_at: float
    detections: list[dict]
    metadata: dict
    failure: str | None = None  # the status message of a job that ends FAILED
    channel: dict | None = None
    tag: str | None = None
    published: bool = False

    def status(self, now: float) -> str:
        if now < self.ends_at:
            return "IN_PROGRESS"
        return "FAILED" if self.failure else "SUCCEEDED"


@dataclass(frozen=True)
class Start:
    """One StartCelebrityRecognition request: the token, the video, the JobId, and whether it started a job."""

    token: str | None
    key: str
    job_id: str | None
    new: bool
    answered: str  # "ok" or the error type
    at: float


@dataclass
class VideoStandIn:
    s3_endpoint: str
    job_seconds: float = 20.0
    job_jitter: float = 0.0  # each job takes job_seconds times a factor drawn within ±this share
    quota: int = 20
    #: The detections of a video, by key (and its bytes); the default finds nobody.
    answer: Callable[[str, bytes], list[dict]] = lambda key, data: []
    #: Why a video's job fails (its status message), by key; None: it does not.
    fail_job: Callable[[str], str | None] = lambda key: None
    #: Each end published twice (SNS delivers at least once: a message may come again).
    repeat_completions: bool = False
    #: Jobs whose end is never published (a lost completion message), by key.
    lose_completion: Callable[[str], bool] = lambda key: False
    #: Called inside a start's request once its job exists, before the answer goes back (a test may
    #: kill the caller there: the job runs, the caller never hears of it).
    on_start: Callable[[VideoJob, bool], None] = lambda job, new: None
    jobs: dict[str, VideoJob] = field(default_factory=dict)
    starts: list[Start] = field(default_factory=list)
    gets: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._random = random.Random(7)
        options = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        self._s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, **options)
        self._sns = boto3.client("sns", endpoint_url=self.s3_endpoint, **options)
        self._ends: list[tuple[float, str]] = []
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._publisher = threading.Thread(target=self._publish_ends, daemon=True)
        self._publisher.start()

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()

    # -- what the tests and benchmarks read --------------------------------------------------------

    def jobs_started(self, key: str, bucket: str | None = None) -> int:
        """How many distinct jobs were started on ``key`` (of ``bucket``; more than 1: started twice)."""
        with self._lock:
            return sum(1 for job in self.jobs.values() if job.key == key and bucket in (None, job.bucket))

    def running_at(self, moment: float) -> int:
        with self._lock:
            return sum(1 for job in self.jobs.values() if job.started_at <= moment < job.ends_at)

    def intervals(self) -> list[tuple[float, float]]:
        with self._lock:
            return [(job.started_at, job.ends_at) for job in self.jobs.values()]

    # -- the protocol ------------------------------------------------------------------------------

    def respond(self, target: str, request: dict) -> dict:
        if target == START:
            return self._start(request)
        return self._get(request)

    def _start(self, request: dict) -> dict:
        video = (request.get("Video") or {}).get("S3Object") or {}
        bucket, key = video.get("Bucket", ""), video.get("Name", "")
        token = request.get("ClientRequestToken")
        now = time.monotonic()
        try:
            job, new = self._open(bucket, key, token, request, now)
        except VideoServiceError as error:
            with self._lock:
                self.starts.append(Start(token, key, None, False, error.error_type, now))
            raise
        with self._lock:
            self.starts.append(Start(token, key, job.job_id, new, "ok", now))
        self.on_start(job, new)
        return {"JobId": job.job_id}

    def _open(self, bucket: str, key: str, token: str | None, request: dict, now: float) -> tuple[VideoJob, bool]:
        with self._lock:
            if token and token in self._tokens:
                job = self.jobs[self._tokens[token]]
                if (job.bucket, job.key) != (bucket, key):
                    raise VideoServiceError(
                        "IdempotentParameterMismatchException", "the token was used with another video"
                    )
                return job, False
            if sum(1 for job in self.jobs.values() if job.status(now) == "IN_PROGRESS") >= self.quota:
                raise VideoServiceError("LimitExceededException", "too many concurrent jobs")
        try:
            data = self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self._s3.exceptions.ClientError as exc:
            raise VideoServiceError(
                "InvalidS3ObjectException", f"Unable to get object metadata from S3: {exc}"
            ) from exc
        metadata, failure = _metadata(data)
        failure = failure or self.fail_job(key)
        job = VideoJob(
            job_id=uuid.uuid4().hex + f"{next(self._ids):08d}",
            token=token,
            bucket=bucket,
            key=key,
            started_at=now,
            ends_at=now + self.job_seconds * self._random.uniform(1 - self.job_jitter, 1 + self.job_jitter),
            detections=[] if failure else self.answer(key, data),
            metadata=metadata,
            failure=failure,
            channel=request.get("NotificationChannel"),
            tag=request.get("JobTag"),
        )
        with self._wake:
            if token and token in self._tokens:  # another start with this token got there first
                return self.jobs[self._tokens[token]], False
            if sum(1 for other in self.jobs.values() if other.status(now) == "IN_PROGRESS") >= self.quota:
                raise VideoServiceError("LimitExceededException", "too many concurrent jobs")  # one started meanwhile
            self.jobs[job.job_id] = job
            if token:
                self._tokens[token] = job.job_id
            heapq.heappush(self._ends, (job.ends_at, job.job_id))
            self._wake.notify_all()
        return job, True

    def _get(self, request: dict) -> dict:
        with self._lock:
            self.gets += 1
            job = self.jobs.get(request.get("JobId", ""))
        if job is None:
            raise VideoServiceError("ResourceNotFoundException", "The job does not exist")
        status = job.status(time.monotonic())
        answer: dict = {
            "JobStatus": status,
            "JobId": job.job_id,
            "Video": {"S3Object": {"Bucket": job.bucket, "Name": job.key}},
        }
        if job.tag:
            answer["JobTag"] = job.tag
        if status == "FAILED":
            answer["StatusMessage"] = job.failure
        if status != "SUCCEEDED":
            return answer
        order = request.get("SortBy", "TIMESTAMP")
        found = sorted(
            job.detections,
            key=(lambda d: (d["Timestamp"], d["Celebrity"]["Id"]))
            if order == "TIMESTAMP"
            else (lambda d: (d["Celebrity"]["Id"], d["Timestamp"])),
        )
        size = int(request.get("MaxResults") or 1000)
        start = _offset(request.get("NextToken"))
        page = found[start : start + size]
        answer.update(VideoMetadata=job.metadata, Celebrities=page)
        if start + size < len(found):
            answer["NextToken"] = base64.b64encode(json.dumps([job.job_id, start + size]).encode()).decode()
        return answer

    # -- completion messages -----------------------------------------------------------------------

    def _publish_ends(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (not self._ends or self._ends[0][0] > time.monotonic()):
                    timeout = None if not self._ends else max(0.0, self._ends[0][0] - time.monotonic())
                    self._wake.wait(timeout)
                if self._stopped:
                    return
                _, job_id = heapq.heappop(self._ends)
                job = self.jobs[job_id]
            if job.channel and not self.lose_completion(job.key):
                self._publish(job)

    def _publish(self, job: VideoJob) -> None:
        message = {
            "JobId": job.job_id,
            "Status": job.status(time.monotonic()),
            "API": "StartCelebrityRecognition",
            "JobTag": job.tag or "",
            "Timestamp": int(time.time() * 1000),
            "Video": {"S3ObjectName": job.key, "S3Bucket": job.bucket},
        }
        try:
            for _ in range(2 if self.repeat_completions else 1):
                self._sns.publish(TopicArn=job.channel["SNSTopicArn"], Message=json.dumps(message))
            job.published = True
        except Exception:  # the test stopped moto: the message is lost, as SNS may lose one
            pass


def _offset(token: str | None) -> int:
    if not token:
        return 0
    try:
        return int(json.loads(base64.b64decode(token))[1])
    except (ValueError, IndexError, TypeError) as exc:
        raise VideoServiceError("InvalidPaginationTokenException", "Invalid pagination token") from exc


def _metadata(data: bytes) -> tuple[dict, str | None]:
    """The VideoMetadata of a video, and why its job fails (None: it succeeds)."""
    try:
        info = probe(BytesRanges(data))
    except Exception as exc:
        return {}, f"Unable to read the video: {exc}"
    metadata = {
        "Codec": info.codec or "",
        "DurationMillis": info.duration_ms or 0,
        "Format": info.format,
        "FrameRate": 25.0,
        "FrameHeight": info.height or 0,
        "FrameWidth": info.width or 0,
    }
    if info.codec != "h264" or info.format not in ("mp4", "mov", "avi"):
        return metadata, f"Unsupported codec/format: {info.format}/{info.codec}"
    return metadata, None
