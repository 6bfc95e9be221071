"""Following a living bucket: S3 Event Notifications read from an SQS queue into a standing scan.

``celebscan follow s3://bucket/prefix/ --queue URL`` receives (long polling, 10 messages at a time,
on a few threads), reads each message's events (``producer/s3_events.py``), keeps those of the
source's bucket and prefix whose key names an image, and applies them to the source's standing scan
in one transaction per receive (``worker/queue/objects.py``): a creation queues the image through
the same filters, skip of what is done and pay-once as a listing, a removal marks it deleted. Only
then are the receive's messages deleted from the queue: an event is applied at least once, and a
repeat changes nothing. A message that is not an S3 event is logged in one line and left to the
queue's redrive policy (its dead-letter queue). The workers take the images through the scan's
window as for any scan (with a broker); without one, a local process pool works beside the follower.

A stop (SIGTERM, Ctrl-C) lets every receive in hand finish, be committed and deleted, then returns.
Several followers of one queue are safe: they share the standing scan, and a message is applied by
whoever receives it, at least once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producer.enqueue import check_broker, open_window
from producer.event_queue import EventQueue, NotificationOverlapError, set_up_event_queue
from producer.local_pool import default_workers, drain_scan, pool_stop
from producer.s3_events import CREATED, MalformedEventError, ObjectEvent, parse_message
from worker.aws import AWS_ERRORS, client, translate
from worker.errors import CelebscanError, ConfigurationError, ObjectMissingError
from worker.media import is_media_name
from worker.queue import scans as scan_states
from worker.queue.images import ImageQueue
from worker.queue.objects import Applied, ObjectChange, apply_changes
from worker.queue.scans import Scans
from worker.retry import retry_database
from worker.settings import Settings
from worker.sources import Source
from worker.store import ResultStore

log = logging.getLogger(__name__)

#: A receive takes at most this many messages (SQS's limit), waiting up to WAIT_SECONDS for the first.
MESSAGES_PER_RECEIVE = 10
WAIT_SECONDS = 20
#: Threads receiving at once: a burst drains at several receives in flight.
RECEIVERS = 4
#: A standing scan's window: slots come back every 2 s at most when idle, so more would only poll.
FOLLOW_WINDOW = 32
#: After a failed receive (the queue or the database away), wait this long before the next.
PAUSE_SECONDS = 5.0


@dataclass
class FollowCounts:
    """What following did so far (summed over the receives, shared by the receiving threads)."""

    messages: int = 0
    events: int = 0
    queued: int = 0
    skipped: int = 0
    deleted: int = 0
    stale: int = 0  # older than (or the same as) an event applied already
    ignored: int = 0  # another bucket or prefix, not an image, a test event's
    malformed: int = 0  # left to the dead-letter queue
    left: int = 0  # left on the queue to come back: a versioned bucket's current version not read
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class Received:
    """One message's changes for the source, or why it was left on the queue."""

    receipt_handle: str
    changes: list[ObjectChange]
    ignored: int = 0
    malformed: str | None = None
    left: str | None = None  # why it was left on the queue to come back (S3 could not be asked)


#: The current version of a key (ETag, size), or None when it has none: S3 asked.
CurrentVersion = Callable[[str], tuple[str, int] | None]


def changes_for(
    source: Source, events: list[ObjectEvent], current: CurrentVersion | None = None
) -> tuple[list[ObjectChange], int]:
    """The events that concern ``source`` (its bucket, under its prefix, an image's name), as
    changes to apply, and how many were ignored.

    A versioned bucket's permanent deletion of one version may leave another version current (an
    older one, when the current was deleted; the same, when an old one was): ``current`` asks S3,
    and the change is the creation of what is current, or a removal when nothing is."""
    changes = []
    for event in events:
        if event.bucket != source.bucket or not event.key.startswith(source.prefix):
            continue
        if event.key.endswith("/") or not is_media_name(event.key):
            continue
        _check_storable(event)
        if event.kind == CREATED:
            if not event.etag or event.size is None:
                raise MalformedEventError(f"a creation of {event.key!r} without its ETag or size")
            changes.append(ObjectChange(CREATED, event.key, event.sequencer, event.etag.strip('"'), event.size))
        elif event.one_version and current is not None and (version := current(event.key)) is not None:
            changes.append(ObjectChange(CREATED, event.key, event.sequencer, version[0].strip('"'), version[1]))
        else:
            changes.append(ObjectChange(event.kind, event.key, event.sequencer))
    return changes, len(events) - len(changes)


#: What S3 allows, and what the database stores: a key of at most 1,024 bytes of UTF-8, an ETag
#: of at most 128 characters (``images.etag``), a size that fits a signed 64-bit integer.
MAX_KEY_BYTES, MAX_ETAG_CHARS, MAX_SIZE = 1024, 128, 2**63 - 1


def _check_storable(event: ObjectEvent) -> None:
    """An event whose key, ETag or size S3 never sends (and the database cannot store) is
    malformed: its message alone is left to the dead-letter queue. Found by the database instead,
    it failed the receive's one transaction, and the good messages received with it went to the
    dead-letter queue too."""
    try:
        encoded = event.key.encode()
    except UnicodeEncodeError as exc:
        raise MalformedEventError(f"a key that is not UTF-8 ({exc.reason})") from exc
    if "\x00" in event.key or len(encoded) > MAX_KEY_BYTES:
        raise MalformedEventError(f"a key S3 does not allow: {event.key[:100]!r}")
    if event.etag is not None and len(event.etag.strip('"')) > MAX_ETAG_CHARS:
        raise MalformedEventError(f"an ETag of {len(event.etag)} characters for {event.key!r}")
    if event.size is not None and not 0 <= event.size <= MAX_SIZE:
        raise MalformedEventError(f"a size of {event.size} bytes for {event.key!r}")


class Follower:
    """Receives the queue's messages and applies them to the source's standing scan."""

    def __init__(
        self,
        store: ResultStore,
        settings: Settings,
        source: Source,
        queue_url: str,
        sqs,
        *,
        open_window: Callable[[int], None] | None = None,
        wait_seconds: int = WAIT_SECONDS,
    ) -> None:
        self.store, self.settings, self.source = store, settings, source
        self.queue_url, self.sqs, self.wait_seconds = queue_url, sqs, wait_seconds
        self.open_window = open_window
        self.counts = FollowCounts()
        self.images = ImageQueue(store.engine, settings.lease_seconds)
        self._scan_lock = threading.Lock()
        self._s3: Any = None  # made at the first versioned deletion: most buckets never need it
        self._s3_lock = threading.Lock()  # receivers are threads; boto3 builds clients unsafely at once
        self.scan_id = self._open_scan()

    def _open_scan(self) -> int:
        """The source's standing scan, with its window for the workers (``open_window``: with a
        broker; the slots are made with the scan, and sent at once here or by the window's keeper)."""
        scans = Scans(self.store.engine)
        window = None if self.open_window is None else min(self.settings.window, FOLLOW_WINDOW)
        scan_id, _ = scans.open_standing(
            self.source.url, self.settings.backend, batch_size=self.settings.batch_size, window=window
        )
        if self.open_window is not None:
            self.open_window(scan_id)
        return scan_id

    def receive_once(self) -> int:
        """One receive: its events applied in one transaction, then its messages deleted (those
        that could be read). Returns the number of messages received."""
        try:
            response = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=MESSAGES_PER_RECEIVE,
                WaitTimeSeconds=self.wait_seconds,
                AttributeNames=["SentTimestamp"],
            )
        except AWS_ERRORS as exc:
            raise translate(exc, f"receiving from {self.queue_url}") from exc
        messages = response.get("Messages", [])
        received = [self._read(message) for message in messages]
        lag = _oldest_age(messages)
        applied = self._apply([change for each in received for change in each.changes], lag)
        readable = [each for each in received if each.malformed is None and each.left is None]
        self._delete(readable)
        self.counts.add(
            messages=len(messages),
            events=sum(len(each.changes) for each in readable),
            queued=applied.queued,
            skipped=applied.skipped,
            deleted=applied.deleted,
            stale=applied.stale,
            ignored=sum(each.ignored for each in readable),
            malformed=sum(each.malformed is not None for each in received),
            left=sum(each.left is not None for each in received),
        )
        return len(messages)

    def _read(self, message: dict) -> Received:
        try:
            changes, ignored = changes_for(self.source, parse_message(message.get("Body", "")), self._current_version)
        except MalformedEventError as exc:
            log.warning(
                "message %s is not an S3 event notification celebscan can read (%s); "
                "left to the queue's dead-letter queue",
                message.get("MessageId", "?"),
                exc,
            )
            return Received(message["ReceiptHandle"], [], malformed=str(exc))
        except CelebscanError as exc:
            log.warning("message %s left on the queue to come back: %s", message.get("MessageId", "?"), exc)
            return Received(message["ReceiptHandle"], [], left=str(exc))
        return Received(message["ReceiptHandle"], changes, ignored)

    def _current_version(self, key: str) -> tuple[str, int] | None:
        """What S3 holds under ``key`` now (ETag, size), or None. Asked by listing the key as a
        prefix, not by a HEAD: a HEAD of a missing key is "denied" (403), not "missing", to a
        role without ``s3:ListBucket`` on the whole bucket; listing needs only what the workers'
        listing does. A denial or an outage raises, typed."""
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = client("s3", self.settings)
        try:
            page = self._s3.list_objects_v2(Bucket=self.source.bucket, Prefix=key, MaxKeys=1)
        except AWS_ERRORS as exc:
            error = translate(exc, f"listing s3://{self.source.bucket}/{key}")
            if isinstance(error, ObjectMissingError):  # the bucket itself is gone
                return None
            raise error from exc
        first = next(iter(page.get("Contents", ())), None)  # the key itself sorts before any longer one
        if first is None or first["Key"] != key:
            return None
        return str(first["ETag"]), int(first["Size"])

    def _apply(self, changes: list[ObjectChange], lag: float | None) -> Applied:
        while True:
            scan_id = self.scan_id
            applied = self._apply_to(scan_id, changes, lag)
            if applied is not None:
                return applied
            with self._scan_lock:  # nobody followed it for a lease and it ended: a new one
                if self.scan_id == scan_id:
                    log.warning("standing scan %d ended (nobody followed it for a lease); opening another", scan_id)
                    self.scan_id = self._open_scan()

    @retry_database
    def _apply_to(self, scan_id: int, changes: list[ObjectChange], lag: float | None) -> Applied | None:
        with self.store.engine.begin() as conn:
            if not scan_states.renew_follow(conn, scan_id, lag):
                return None
            if not changes:
                return Applied()
            bucket, backend = self.source.bucket, self.settings.backend
            return apply_changes(conn, self.images, scan_id, bucket, backend, changes)

    def _delete(self, received: list[Received]) -> None:
        if not received:
            return
        entries = [{"Id": str(n), "ReceiptHandle": each.receipt_handle} for n, each in enumerate(received)]
        try:
            response = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except AWS_ERRORS as exc:  # applied already: a redelivery is a no-op
            log.warning("could not delete %d applied messages (they come again, harmlessly): %s", len(entries), exc)
            return
        for failure in response.get("Failed", []):
            log.warning("could not delete an applied message (it will come again, harmlessly): %s", failure)


def _oldest_age(messages: list[dict]) -> float | None:
    sent = [int(m.get("Attributes", {}).get("SentTimestamp", 0)) for m in messages]
    sent = [each for each in sent if each]
    return max(0.0, time.time() - min(sent) / 1000) if sent else None


def follow(follower: Follower, stop: threading.Event, receivers: int = RECEIVERS) -> FollowCounts:
    """Receive on ``receivers`` threads until ``stop`` is set; each finishes the receive in hand."""

    def receive_until_stopped() -> None:
        while not stop.is_set():
            try:
                follower.receive_once()
            except (CelebscanError, *AWS_ERRORS) as exc:
                log.warning("receiving events failed: %s; trying again in %.0f s", exc, PAUSE_SECONDS)
                stop.wait(PAUSE_SECONDS)
            except Exception:
                log.exception("receiving events failed; trying again in %.0f s", PAUSE_SECONDS)
                stop.wait(PAUSE_SECONDS)

    threads = [
        threading.Thread(target=receive_until_stopped, name=f"receiver-{n}", daemon=True) for n in range(receivers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return follower.counts


def set_up(settings: Settings, source: Source, queue_name: str) -> EventQueue:
    """``follow --setup``: the queue (and dead-letter queue) the source's bucket sends its events to,
    for this account (``producer/event_queue.py``)."""
    from worker.aws import client

    try:
        account = client("sts", settings).get_caller_identity()["Account"]
        return set_up_event_queue(
            client("s3", settings), client("sqs", settings), account, source.bucket, source.prefix, queue_name
        )
    except AWS_ERRORS as exc:
        raise translate(exc, f"setting up the event queue of {source.url}") from exc
    except NotificationOverlapError as exc:
        raise ConfigurationError(str(exc)) from exc


def default_queue_name(source: Source) -> str:
    """``celebscan-<bucket>-events``, within SQS's 80 characters (the dead-letter queue adds 4)."""
    name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in f"celebscan-{source.bucket}-events")
    return name[:76]


def run_follow(
    store: ResultStore,
    settings: Settings,
    source: Source,
    queue_url: str,
    stop: threading.Event,
    say: Callable[[str], None] = print,
    *,
    receivers: int = RECEIVERS,
    wait_seconds: int = WAIT_SECONDS,
) -> FollowCounts:
    """Follow ``source`` from ``queue_url`` until ``stop`` is set: with a broker, a new standing
    scan gets a window of at most FOLLOW_WINDOW slots for the workers; without one, a local pool
    works the scan here meanwhile, and stops with the follower."""
    from worker.aws import client

    sqs = client("sqs", settings)
    try:
        sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    except AWS_ERRORS as exc:
        raise translate(exc, f"reading the queue {queue_url}") from exc
    window = min(settings.window, FOLLOW_WINDOW)
    if not settings.embedded:
        check_broker(settings)

    def open_scan_window(scan_id: int) -> None:
        open_window(settings, store.engine, scan_id, window=window)

    follower = Follower(
        store,
        settings,
        source,
        queue_url,
        sqs,
        open_window=None if settings.embedded else open_scan_window,
        wait_seconds=wait_seconds,
    )
    say(f"following {source.url} from {queue_url}: standing scan {follower.scan_id} (backend {settings.backend})")
    if settings.embedded:
        say("without a broker, a local pool recognizes here; stop with Ctrl-C or SIGTERM")
        worker = _LocalWork(settings, follower, stop)
        try:
            counts = follow(follower, stop, receivers)
        finally:
            worker.stop()
    else:
        say(f"the workers take its images through a window of {window} slots; stop with Ctrl-C or SIGTERM")
        counts = follow(follower, stop, receivers)
    return counts


class _LocalWork:
    """The embedded follow's workers: the standing scan drained by a local pool, beside the follower."""

    def __init__(self, settings: Settings, follower: Follower, stop: threading.Event) -> None:
        self.settings, self.follower, self.following = settings, follower, stop
        self.workers = settings.workers or default_workers()
        self.pool_stop = pool_stop() if self.workers > 1 else threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="local-pool", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            while not self.following.is_set() and not self.pool_stop.is_set():
                drain_scan(self.settings, self.follower.scan_id, self.workers, stop=self.pool_stop)
        except BaseException as exc:  # the follower stops too: its images would wait for nobody
            log.exception("the local workers stopped")
            self.error = exc
            self.following.set()

    def stop(self) -> None:
        self.pool_stop.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
