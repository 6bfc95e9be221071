"""The world a simulated run talks to: an S3 bucket, the recognizer, the broker, each with faults.

They speak the protocols the real code speaks (boto3's ``list_objects_v2`` and ``get_object``, the
``Recognizer`` protocol, Celery's send and deliver), and each call is a point where the scheduler
may run another task, and where the seeded faults strike: throttling, 5xx, slowness, and for the
broker redelivery, duplicates, loss, reordering and delay.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from botocore.exceptions import ClientError

from tests.simulation.scheduler import Scheduler, SimulatedCrash
from worker.media.images import LoadedImage
from worker.recognition import BoundingBox, Celebrity, RecognitionResult
from worker.sources import S3Location

BUCKET = "sim"


@cache
def picture_bytes(number: int) -> bytes:
    """A small PNG, different for each number (a picture; its copies are the same bytes)."""
    from PIL import Image

    image = Image.new("RGB", (96, 96), (number * 37 % 256, number * 91 % 256, number * 53 % 256))
    image.putpixel((number % 96, number // 96 % 96), (255 - number % 256, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


NOT_AN_IMAGE = b"these are my notes, not a picture"


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass
class Faults:
    """How often each fault strikes while the chaos lasts (all off once it is quiet)."""

    active: bool = True
    crash_before_commit: float = 0.0
    crash_after_commit: float = 0.0
    lost_ack: float = 0.0
    s3_throttle: float = 0.0
    recognizer_throttle: float = 0.0
    recognizer_5xx: float = 0.0
    duplicate: float = 0.0
    loss: float = 0.0
    redeliver_at_once: float = 0.5  # else after the visibility timeout

    def chance(self, rng: random.Random, probability: float) -> bool:
        return self.active and probability > 0 and rng.random() < probability


@dataclass
class StoredObject:
    data: bytes
    etag: str


class Bucket:
    """The objects under simulation: keys to bytes, with S3's ETag (the MD5 of a single-part upload)."""

    def __init__(self) -> None:
        self.objects: dict[str, StoredObject] = {}
        self.changed: set[str] = set()  # keys written or deleted after the first scan began

    def put(self, key: str, data: bytes, multipart: bool = False, *, change: bool = False) -> None:
        etag = md5(data) + ("-2" if multipart else "")
        self.objects[key] = StoredObject(data, etag)
        if change:
            self.changed.add(key)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)
        self.changed.add(key)


class SimS3:
    """An S3 client over a :class:`Bucket`: ListObjectsV2 (a page holds at most ``page_cap`` keys,
    as S3 may return fewer than asked) and GetObject, with throttling."""

    def __init__(self, bucket: Bucket, scheduler: Scheduler, rng: random.Random, faults: Faults, page_cap: int):
        self.bucket, self.scheduler, self.rng, self.faults, self.page_cap = bucket, scheduler, rng, faults, page_cap

    def _call(self, operation: str) -> None:
        self.scheduler.sleep(self.rng.uniform(0.0, 0.05))
        if self.faults.chance(self.rng, self.faults.s3_throttle):
            raise ClientError(
                {
                    "Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
                    "ResponseMetadata": {"HTTPStatusCode": 503},
                },
                operation,
            )

    def list_objects_v2(self, Bucket, Prefix="", MaxKeys=1000, StartAfter=None, ContinuationToken=None):  # noqa: N803
        self._call("ListObjectsV2")
        after = ContinuationToken or StartAfter
        keys = sorted(key for key in self.bucket.objects if key.startswith(Prefix) and (after is None or key > after))
        page = keys[: min(MaxKeys, self.page_cap)]
        response: dict = {
            "IsTruncated": len(keys) > len(page),
            "KeyCount": len(page),
            "Contents": [
                {"Key": key, "ETag": f'"{self.bucket.objects[key].etag}"', "Size": len(self.bucket.objects[key].data)}
                for key in page
            ],
        }
        if response["IsTruncated"]:
            response["NextContinuationToken"] = page[-1]
        if not page:
            del response["Contents"]
        return response

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803
        self._call("GetObject")
        stored = self.bucket.objects.get(Key)
        if stored is None:
            raise ClientError(
                {"Error": {"Code": "NoSuchKey", "Message": "The specified key does not exist."}}, "GetObject"
            )
        if IfMatch is not None and IfMatch.strip('"') != stored.etag:
            raise ClientError(
                {
                    "Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-conditions failed"},
                    "ResponseMetadata": {"HTTPStatusCode": 412},
                },
                "GetObject",
            )
        return {"ContentLength": len(stored.data), "Body": io.BytesIO(stored.data)}


@dataclass
class Calls:
    """Every paid call, by picture, and who made it: the truth the checker holds the database to."""

    by_picture: Counter = field(default_factory=Counter)
    made: int = 0


class SimRecognizer:
    """A paid recognizer (named like Rekognition): each picture has one celebrity named after it."""

    name = "rekognition"

    def __init__(
        self,
        scheduler: Scheduler,
        rng: random.Random,
        faults: Faults,
        calls: Calls,
        on_call: Callable[[str, str], None],
        poison: set[str],
    ) -> None:
        self.scheduler, self.rng, self.faults, self.calls = scheduler, rng, faults, calls
        self.on_call, self.poison = on_call, poison

    def recognize(self, image: LoadedImage, location: S3Location | None = None) -> RecognitionResult:
        from worker.errors import ServiceUnavailableError, ThrottledError

        picture = md5(image.data)
        self.scheduler.sleep(self.rng.uniform(0.2, 2.0))  # about a second a call
        if self.faults.chance(self.rng, self.faults.recognizer_throttle):
            raise ThrottledError("Rate exceeded")
        if self.faults.chance(self.rng, self.faults.recognizer_5xx):
            raise ServiceUnavailableError("Service unavailable", code="InternalServerError")
        self.calls.made += 1
        self.calls.by_picture[picture] += 1
        self.on_call(picture, location.key if location else "")
        if picture in self.poison:
            raise SimulatedCrash(f"picture {picture[:8]} kills the worker")
        return answer_for(picture)


def answer_for(picture: str) -> RecognitionResult:
    box = BoundingBox(0.1, 0.1, 0.3, 0.3)
    return RecognitionResult(celebrities=(Celebrity(f"person {picture[:8]}", picture[:8], 99.0, box),))


@dataclass(eq=False)
class Message:
    kind: str  # "slot" or "list"
    args: tuple
    eta: float
    number: int
    held_by: object | None = None  # the process running it (unacknowledged)


class SimBroker:
    """Celery over Redis, as far as the queue of record cares: messages with a countdown, taken
    in any order once due, acknowledged after the run; a run that dies leaves its message to be
    delivered again (at once, or after the visibility timeout); messages may come twice or never."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, faults: Faults, visibility: float) -> None:
        self.scheduler, self.rng, self.faults, self.visibility = scheduler, rng, faults, visibility
        self.messages: list[Message] = []
        self.sent = self.lost = self.duplicated = 0
        self._numbers = 0

    def send(self, kind: str, args: tuple, countdown: float = 0.0) -> None:
        self.sent += 1
        if self.faults.chance(self.rng, self.faults.loss):
            self.lost += 1
            return
        copies = 2 if self.faults.chance(self.rng, self.faults.duplicate) else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            self._numbers += 1
            delay = self.rng.uniform(0.0, 0.5)  # delivery is never instant, and reorders
            self.messages.append(Message(kind, args, self.scheduler.t + countdown + delay, self._numbers))

    def take(self, process: object) -> Message | None:
        due = [m for m in self.messages if m.held_by is None and m.eta <= self.scheduler.t]
        if not due:
            return None
        message = self.rng.choice(due)
        message.held_by = process
        return message

    def next_due(self) -> float:
        """When the next message not being run is due (far away when there is none)."""
        return min((m.eta for m in self.messages if m.held_by is None), default=self.scheduler.t + 3600.0)

    def ack(self, message: Message) -> None:
        if message in self.messages:  # (a broker restarted empty has forgotten it)
            self.messages.remove(message)

    def died(self, process: object) -> None:
        """A process died: its unacknowledged message is delivered again."""
        for message in self.messages:
            if message.held_by is process:
                message.held_by = None
                at_once = self.rng.random() < self.faults.redeliver_at_once
                message.eta = self.scheduler.t + (0.0 if at_once else self.visibility)

    def forget_everything(self) -> None:
        """Redis restarted without its data."""
        self.lost += len(self.messages)
        self.messages.clear()

    def waiting_for(self, scan_id: int, part_scans: dict[int, int]) -> bool:
        """Whether any message of the scan is still in the broker (a slot, or a part of its listing)."""
        return any(
            (m.kind == "slot" and m.args[0] == scan_id) or (m.kind == "list" and part_scans.get(m.args[0]) == scan_id)
            for m in self.messages
        )
