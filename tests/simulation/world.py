"""The world a simulated run talks to: an S3 bucket, the recognizer, the broker, each with faults.

They speak the protocols the real code speaks (boto3's ``list_objects_v2`` and ``get_object``, the
``Recognizer`` protocol, and Redis as Celery's kombu transport keeps it: a queue, the messages
delivered and not acknowledged, the visibility timeout), and each call is a point where the
scheduler may run another task, and where the seeded faults strike: throttling, 5xx, spells of
slow calls, and for the broker duplicates, loss, reordering, delay and a restart without its data.
What Celery's workers do with the broker (prefetch, acknowledgements, time limits, a node or a
process dying) is ``tests/simulation/celery_model.py``.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cache

from botocore.exceptions import ClientError

from tests.simulation.scheduler import Scheduler, SimulatedCrash
from worker.media.images import LoadedImage
from worker.queue.slots import SlotMessage
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
    #: Spells of slow calls (seconds, from their start): a call made within one takes ``slow_call``.
    slow_spells: list[tuple[float, float]] = field(default_factory=list)
    slow_call: tuple[float, float] = (0.0, 0.0)
    crash_before_commit: float = 0.0
    crash_after_commit: float = 0.0
    lost_ack: float = 0.0
    s3_throttle: float = 0.0
    recognizer_throttle: float = 0.0
    recognizer_5xx: float = 0.0
    duplicate: float = 0.0
    loss: float = 0.0

    def chance(self, rng: random.Random, probability: float) -> bool:
        return self.active and probability > 0 and rng.random() < probability

    def slow_at(self, t: float) -> bool:
        return self.active and any(start <= t < end for start, end in self.slow_spells)


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
        slow = self.faults.slow_at(self.scheduler.t)
        self.scheduler.sleep(self.rng.uniform(*self.faults.slow_call) if slow else self.rng.uniform(0.2, 2.0))
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
    """A message as Redis holds it for Celery: by its task id (a window slot's names its generation)."""

    id: str
    kind: str  # "slot" or "list"
    args: tuple
    visible_at: float  # when it reaches the queue (delivery takes a moment, and reorders)
    eta: float  # a countdown's end (0: none): its worker holds it, unacknowledged, until then
    number: int
    holder: object | None = None  # the node that fetched it and has not acknowledged it
    delivered_at: float = 0.0
    fate: str = ""  # how it left the broker: acknowledged, lost, flushed, ...
    receivers: list = field(default_factory=list)  # the nodes it was delivered to
    requeued_at_time_limit: bool = False
    restored: bool = False  # put back by the visibility timeout while unacknowledged


class SimBroker:
    """Redis under Celery: a queue (first in, first out, once visible), the messages delivered and
    not yet acknowledged, and :meth:`restore_visible`, which puts back at the head of the queue a
    message unacknowledged for the visibility timeout, whether or not its worker still runs it.
    A message may be lost or come twice; :meth:`flush` is Redis restarted without its data."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, faults: Faults, visibility: float) -> None:
        self.scheduler, self.rng, self.faults, self.visibility = scheduler, rng, faults, visibility
        self.queue: list[Message] = []
        self.unacked: list[Message] = []
        self.history: dict[str, list[Message]] = {}  # every message sent, by id: the checker reads their fates
        self.sent = self.lost = self.duplicated = 0
        self._numbers = 0
        self.on_message: Callable[[], None] = lambda: None  # a consumer waiting for messages wakes

    def send(self, kind: str, args: tuple, countdown: float = 0.0, message_id: str | None = None) -> None:
        self.sent += 1
        self._numbers += 1
        message_id = message_id or f"{kind}-{self._numbers}"
        copies = 2 if self.faults.chance(self.rng, self.faults.duplicate) else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            self._numbers += 1
            delay = self.rng.uniform(0.0, 0.5)  # delivery is never instant, and reorders
            eta = self.scheduler.t + countdown if countdown else 0.0
            message = Message(message_id, kind, args, self.scheduler.t + delay, eta, self._numbers)
            self.history.setdefault(message_id, []).append(message)
            if self.faults.chance(self.rng, self.faults.loss):
                self.lost += 1
                message.fate = "lost"
                continue
            self.queue.append(message)
        self.on_message()

    def fetch(self, node: object) -> Message | None:
        """The head of the queue, delivered to ``node`` (now unacknowledged), if one is visible."""
        visible = [message for message in self.queue if message.visible_at <= self.scheduler.t]
        if not visible:
            return None
        message = min(visible, key=lambda m: (m.visible_at, m.number))
        self.queue.remove(message)
        message.holder, message.delivered_at = node, self.scheduler.t
        message.receivers.append(node)
        self.unacked.append(message)
        return message

    def next_visible(self) -> float | None:
        return min((message.visible_at for message in self.queue), default=None)

    def ack(self, message: Message, fate: str = "acknowledged") -> None:
        if message in self.unacked:  # (a broker restarted empty has forgotten it)
            self.unacked.remove(message)
            message.holder, message.fate = None, fate

    def requeue(self, message: Message) -> None:
        """Rejected with requeue: to the back of the queue, at once."""
        if message in self.unacked:
            self.unacked.remove(message)
            message.holder, message.eta = None, 0.0
            message.visible_at = self.scheduler.t
            self._numbers += 1
            message.number = self._numbers
            self.queue.append(message)
            self.on_message()

    def restore_visible(self) -> None:
        """Messages unacknowledged for the visibility timeout go back to the head of the queue (a
        live worker's copy runs on: the message is run twice)."""
        cutoff = self.scheduler.t - self.visibility
        for message in [m for m in self.unacked if m.delivered_at <= cutoff]:
            self.unacked.remove(message)
            message.holder, message.eta, message.restored = None, 0.0, True
            message.visible_at = self.scheduler.t
            message.number = -self._numbers  # the head of the queue
            self.queue.append(message)
            self.on_message()

    def flush(self) -> None:
        """Redis restarted without its data."""
        for message in self.queue + self.unacked:
            message.fate, message.holder = "flushed", None
        self.lost += len(self.queue) + len(self.unacked)
        self.queue.clear()
        self.unacked.clear()

    def waiting_for(self, scan_id: int, part_scans: dict[int, int]) -> bool:
        """Whether any message of the scan is still in the broker (a slot, or a part of its listing)."""
        return any(
            (m.kind == "slot" and m.args[0] == scan_id) or (m.kind == "list" and part_scans.get(m.args[0]) == scan_id)
            for m in self.queue + self.unacked
        )


class SimWindowBroker:
    """``worker.broker.WindowBroker`` over the simulated Redis: window slots sent by their message
    id, and asked for as the keeper asks Redis (waiting, or delivered within a lease)."""

    def __init__(self, broker: SimBroker) -> None:
        self.broker = broker

    def send(self, messages: Sequence[SlotMessage]) -> list[SlotMessage]:
        for message in messages:
            self.broker.send("slot", (message.scan_id, message.slot, message.generation), 0.0, message.message_id)
        return []

    def present(self, messages: Collection[SlotMessage], delivered_within: float) -> set[SlotMessage]:
        since = self.broker.scheduler.t - delivered_within
        ids = {m.id for m in self.broker.queue} | {m.id for m in self.broker.unacked if m.delivered_at >= since}
        return {message for message in messages if message.message_id in ids}
