"""A small HTTP stand-in for Amazon Rekognition's RecognizeCelebrities (moto has none); with
``video`` set, its server also answers Rekognition Video (``tests/rekognition_video_standin.py``).

It speaks the service's JSON protocol (``X-Amz-Target: RekognitionService.RecognizeCelebrities``,
``application/x-amz-json-1.1``), so the worker's real boto3 code runs unchanged against it. Like the
real service it reads ``S3Object`` images from S3 (here: moto's server), refuses what is not a JPEG
or PNG, and refuses bytes over 5 MB. The test chooses the answers and can make it throttle, fail
with 5xx or answer slowly; every call is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3

from tests.rekognition_video_standin import TARGETS as VIDEO_TARGETS
from tests.rekognition_video_standin import VideoServiceError
from tests.servers import free_port

TARGET = "RekognitionService.RecognizeCelebrities"


@dataclass(frozen=True)
class Call:
    kind: str  # "S3Object" or "Bytes"
    key: str | None
    digest: str
    size: int
    answered: str  # "ok", or the error type returned
    client: str = ""  # the caller's IP address


class ServiceError(Exception):
    def __init__(self, status: int, error_type: str, message: str = "") -> None:
        super().__init__(message or error_type)
        self.status, self.error_type = status, error_type


def celebrity(name: str, *, left: float = 0.3, confidence: float = 98.5, gender: str = "Male") -> dict:
    """A CelebrityFaces entry with every field the real service returns."""
    box = {"Width": 0.2, "Height": 0.3, "Left": left, "Top": 0.2}
    return {
        "Urls": [f"www.wikidata.org/wiki/{name}"],
        "Name": name,
        "Id": hashlib.md5(name.encode()).hexdigest()[:8],
        "Face": {
            "BoundingBox": box,
            "Confidence": 99.9,
            "Landmarks": [
                {"Type": "eyeLeft", "X": left + 0.05, "Y": 0.3},
                {"Type": "eyeRight", "X": left + 0.15, "Y": 0.3},
            ],
            "Pose": {"Roll": 1.5, "Yaw": -3.0, "Pitch": 4.2},
            "Quality": {"Brightness": 80.1, "Sharpness": 92.3},
            "Emotions": [{"Type": "HAPPY", "Confidence": 90.0}],
            "Smile": {"Value": True, "Confidence": 95.0},
        },
        "MatchConfidence": confidence,
        "KnownGender": {"Type": gender},
    }


@dataclass
class RekognitionStandIn:
    """Answers come from ``answer(key, image_bytes)`` (``key`` is None for Bytes requests)."""

    s3_endpoint: str
    host: str = "127.0.0.1"
    answer: Callable[[str | None, bytes], dict] = lambda key, data: {"CelebrityFaces": [], "UnrecognizedFaces": []}
    throttle_every: int = 0  # every n-th call answers ThrottlingException (0: never)
    fail_every: int = 0  # every n-th call answers 500 InternalServerError
    throttle_share: float = 0.0  # this share of calls, drawn at random, answers ThrottlingException
    fail_share: float = 0.0  # this share of calls, drawn at random, answers 500 InternalServerError
    seed: int = 7
    delay: float = 0.0
    quota_tps: float = 0.0  # like the account's quota: calls beyond it per second are throttled (0: none)
    calls: list[Call] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    arrivals: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, caller's IP) of each request
    #: Rekognition Video's operations, answered by ``tests/rekognition_video_standin.py`` when set.
    video: Any = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._quota_tokens, self._quota_at = self.quota_tps, time.monotonic()
        #: ``request.client_port``: the caller's TCP port, readable from ``answer`` (tests find the caller's pid).
        self.request = threading.local()
        self._counter = itertools.count(1)
        self._random = random.Random(self.seed)
        self._s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self.port = free_port()
        self.url = f"http://{self.host}:{self.port}"
        self._server = ThreadingHTTPServer((self.host, self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RekognitionStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def received(self) -> int:
        """Requests that have arrived, answered or not (``calls`` records them once answered)."""
        return len(self.arrivals)

    def respond(self, request: dict) -> dict:
        number = next(self._counter)
        with self._lock:
            self.arrivals.append((time.monotonic(), getattr(self.request, "client_host", "")))
        within_quota = self._take_quota_token()
        if self.delay:
            time.sleep(self.delay)
        image = request.get("Image", {})
        key, data = self._image(image)
        kind = "S3Object" if "S3Object" in image else "Bytes"
        client = getattr(self.request, "client_host", "")

        def call(answered: str) -> Call:
            return Call(kind, key, hashlib.md5(data).hexdigest(), len(data), answered, client)

        try:
            if not within_quota:
                raise ServiceError(400, "ProvisionedThroughputExceededException", "Provisioned rate exceeded")
            if self.throttle_every and number % self.throttle_every == 0:
                raise ServiceError(400, "ThrottlingException", "Rate exceeded")
            if self.fail_every and number % self.fail_every == 0:
                raise ServiceError(500, "InternalServerError", "Internal server error")
            with self._lock:
                draw = self._random.random()
            if draw < self.throttle_share:
                raise ServiceError(400, "ThrottlingException", "Rate exceeded")
            if draw < self.throttle_share + self.fail_share:
                raise ServiceError(500, "InternalServerError", "Internal server error")
            _check_image(data, 15 * 1024 * 1024 if kind == "S3Object" else 5 * 1024 * 1024)
            response = self.answer(key, data)
        except ServiceError as error:
            self._record(call(error.error_type))
            raise
        self._record(call("ok"))
        with self._lock:
            self.accepted_at.append(time.monotonic())
        return response

    def _take_quota_token(self) -> bool:
        """A token bucket holding one second of quota, refilled continuously."""
        if not self.quota_tps:
            return True
        with self._lock:
            now = time.monotonic()
            self._quota_tokens = min(self.quota_tps, self._quota_tokens + (now - self._quota_at) * self.quota_tps)
            self._quota_at = now
            if self._quota_tokens >= 1:
                self._quota_tokens -= 1
                return True
            return False

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _image(self, image: dict) -> tuple[str | None, bytes]:
        if "S3Object" in image:
            location = image["S3Object"]
            try:
                body = self._s3.get_object(Bucket=location["Bucket"], Key=location["Name"])["Body"].read()
            except self._s3.exceptions.ClientError as exc:
                raise ServiceError(
                    400, "InvalidS3ObjectException", f"Unable to get object metadata from S3: {exc}"
                ) from exc
            return location["Name"], body
        if "Bytes" in image:
            return None, base64.b64decode(image["Bytes"])
        raise ServiceError(400, "InvalidParameterException", "Image is required")

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                standin.request.client_host, standin.request.client_port = self.client_address[:2]
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                target = self.headers.get("X-Amz-Target")
                if standin.video is not None and target in VIDEO_TARGETS:
                    try:
                        return self._send(200, standin.video.respond(target, json.loads(body)))
                    except VideoServiceError as error:
                        return self._send(error.status, {"__type": error.error_type, "message": str(error)})
                if target != TARGET:
                    return self._send(400, {"__type": "UnknownOperationException", "message": "unsupported"})
                try:
                    self._send(200, standin.respond(json.loads(body)))
                except ServiceError as error:
                    self._send(error.status, {"__type": error.error_type, "message": str(error)})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/x-amz-json-1.1")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the caller was killed mid-request, as some tests intend

            def log_message(self, *args) -> None:
                pass

        return Handler


def _check_image(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise ServiceError(400, "ImageTooLargeException", "Image size is too large.")
    if not (data.startswith(b"\xff\xd8\xff") or data.startswith(b"\x89PNG\r\n\x1a\n")):
        raise ServiceError(400, "InvalidImageFormatException", "Request has invalid image format")
