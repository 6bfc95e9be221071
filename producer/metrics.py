"""What an operator or an autoscaler needs to know about the work left: one reading, three outputs.

A reading joins the database (images still queued, per unfinished scan) with the broker (batches
waiting in Redis, batches delivered but not yet acknowledged) and the live worker nodes (a Celery
ping). For a followed bucket (``celebscan follow``) it adds each open standing scan's events' lag and
when a follower last renewed it, and the S3 events waiting in the SQS queue named by
CELEBSCAN_EVENTS_QUEUE_URL, which count in the backlog (each is at most one image to recognize). It
prints as text, JSON or Prometheus' text format, and can be published to CloudWatch, where the
deploy kit's scaling policy reads ``BacklogPerWorker``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from worker.aws import AWS_ERRORS, client, translate
from worker.celery_config import LISTING_QUEUE, QUEUE, make_celery
from worker.database import aware_utc
from worker.errors import CelebscanError, ConfigurationError
from worker.read_models import ScanProgress
from worker.schema import QUEUED, STATUSES, scans
from worker.settings import Settings
from worker.store import ResultStore

#: kombu's Redis transport keeps a queue's messages of priority p > 0 under QUEUE + this + p.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)
#: ... and the messages delivered to a worker but not yet acknowledged in this hash.
_UNACKED_KEY = "unacked"
DEFAULT_NAMESPACE = "Celebscan"
#: What ``--cloudwatch`` publishes (deploy/aws/celebscan.yaml's alarms read two of them), and in what unit.
CLOUDWATCH_UNITS = {
    "PendingImages": "Count",
    "BacklogImages": "Count",
    "BacklogPerWorker": "Count",
    "QueueLength": "Count",
    "WorkersOnline": "Count",
    "EventsWaiting": "Count",
    "EventLagSeconds": "Seconds",
}
CLOUDWATCH_METRICS = tuple(CLOUDWATCH_UNITS)
#: The SQS attributes whose sum is the events waiting: visible, and received but not yet deleted.
_EVENT_COUNTS = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StandingScan:
    """An open standing scan (``celebscan follow``): how far behind its events are, and its follower."""

    scan_id: int
    source: str
    backend: str
    events: int
    deletions: int
    #: How long the oldest message of the last receive that brought messages had waited in the queue.
    event_lag_seconds: float | None
    #: When a follower last renewed it (every receive does); None if none ever did.
    followed_at: datetime | None

    def followed_seconds_ago(self, now: float) -> float | None:
        return None if self.followed_at is None else max(0.0, now - self.followed_at.timestamp())


@dataclass(frozen=True)
class Reading:
    scans: list[ScanProgress]
    waiting_batches: int | None = None  # None: no broker configured
    unacked_batches: int | None = None
    workers: int | None = None
    #: Late writes refused because their run had lost its claim (a stalled or partitioned worker
    #: whose lease ran out): each one's paid call is still counted; many mean leases too short.
    refused_writes: int = 0
    standing: list[StandingScan] = field(default_factory=list)
    #: The SQS queue of a followed bucket's events (CELEBSCAN_EVENTS_QUEUE_URL); "" when none is set.
    events_queue_url: str = ""
    #: Its messages, visible or received and not yet deleted; None with no queue, or when unreadable.
    events_waiting: int | None = None
    #: Why the queue could not be read (the events waiting are then unknown).
    events_queue_error: str | None = None
    #: When the fleet's window keeper last renewed its lease (None: no worker ever kept the window).
    keeper_seen_at: datetime | None = None
    taken_at: float = field(default_factory=time.time)

    @property
    def pending_images(self) -> int:
        return sum(scan.counts[QUEUED] for scan in self.scans if not scan.finished)

    @property
    def broker_batches(self) -> int | None:
        """Batches in the broker, waiting or delivered and not yet acknowledged; None with no broker."""
        if self.waiting_batches is None:
            return None
        return self.waiting_batches + (self.unacked_batches or 0)

    @property
    def backlog_images(self) -> int:
        """Queued images that workers can get to (those of scans with a window; the fleet's window
        keeper sends its slots again should the broker lose them), and the S3 events waiting in the
        follow queue: each is at most one image to recognize.

        A scan with no window slot left keeps images queued that no worker will receive; counting
        them would keep paid instances idle. Such a scan is reported as stalled instead, to be
        handed out again with ``scan --resume``.
        """
        stalled = set(self.stalled_scans)
        queued = sum(scan.counts[QUEUED] for scan in self.scans if not scan.finished and scan.scan_id not in stalled)
        return queued + (self.events_waiting or 0)

    @property
    def event_lag_seconds(self) -> float | None:
        """The largest events' lag of the open standing scans; None when none has received any."""
        lags = [scan.event_lag_seconds for scan in self.standing if scan.event_lag_seconds is not None]
        return max(lags) if lags else None

    @property
    def backlog_per_worker(self) -> float:
        """The scaling signal: with no worker online it equals the whole backlog, so 0 scales out."""
        return self.backlog_images / max(self.workers or 0, 1)

    @property
    def stalled_scans(self) -> list[int]:
        """Unfinished scans with no window slot left (with a broker): nothing will move them on."""
        if self.waiting_batches is None:
            return []
        return [scan.scan_id for scan in self.scans if scan.stalled]

    @property
    def repairing_scans(self) -> list[int]:
        """Unfinished scans with slots whose run stopped renewing them: the window's keeper is
        sending them again (a node died or stalled)."""
        return [scan.scan_id for scan in self.scans if scan.window is not None and scan.window.lapsed]

    @property
    def keeper_seconds_ago(self) -> float | None:
        """How long ago the fleet's window keeper last renewed its lease (None: never)."""
        return None if self.keeper_seen_at is None else max(0.0, self.taken_at - self.keeper_seen_at.timestamp())

    def as_dict(self) -> dict:
        return {
            "taken_at": self.taken_at,
            "pending_images": self.pending_images,
            "backlog_images": self.backlog_images,
            "backlog_per_worker": self.backlog_per_worker,
            "waiting_batches": self.waiting_batches,
            "unacked_batches": self.unacked_batches,
            "workers": self.workers,
            "stalled_scans": self.stalled_scans,
            "repairing_scans": self.repairing_scans,
            "keeper_seconds_ago": self.keeper_seconds_ago,
            "refused_writes": self.refused_writes,
            "events_queue_url": self.events_queue_url or None,
            "events_waiting": self.events_waiting,
            "events_queue_error": self.events_queue_error,
            "event_lag_seconds": self.event_lag_seconds,
            "standing_scans": [
                {
                    "scan_id": scan.scan_id,
                    "source": scan.source,
                    "backend": scan.backend,
                    "events": scan.events,
                    "deletions": scan.deletions,
                    "event_lag_seconds": scan.event_lag_seconds,
                    "followed_at": scan.followed_at.timestamp() if scan.followed_at else None,
                    "followed_seconds_ago": scan.followed_seconds_ago(self.taken_at),
                }
                for scan in self.standing
            ],
            "scans": [
                {
                    "scan_id": scan.scan_id,
                    "finished": scan.finished,
                    "images": scan.counts,
                    "unserved": scan.unserved,
                    "window": dataclasses.asdict(scan.window) if scan.window is not None else None,
                    "last_processed_at": scan.last_processed_at.timestamp() if scan.last_processed_at else None,
                }
                for scan in self.scans
            ],
        }


def take_reading(store: ResultStore, settings: Settings, ping_timeout: float = 1.0) -> Reading:
    progress, refused = store.progress(), store.refused_writes()
    following = dict(
        standing=standing_scans(store),
        events_queue_url=settings.events_queue_url,
        **_events_waiting(settings),
    )
    if settings.embedded:
        return Reading(progress, refused_writes=refused, **following)
    waiting, unacked = broker_depth(settings.broker_url)
    workers = online_workers(settings, ping_timeout)
    return Reading(progress, waiting, unacked, workers, refused, keeper_seen_at=store.keeper_seen_at(), **following)


def standing_scans(store: ResultStore) -> list[StandingScan]:
    """The open standing scans: those whose events a follower records (until nobody did for a lease)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(scans).where(scans.c.standing.is_(True), scans.c.listing_finished_at.is_(None)).order_by(scans.c.id)
        ).all()
    return [
        StandingScan(
            row.id,
            row.source,
            row.backend,
            row.events,
            row.deletions,
            row.event_lag_seconds,
            aware_utc(row.followed_at) if row.followed_at is not None else None,
        )
        for row in rows
    ]


def events_waiting(settings: Settings, queue_url: str) -> int:
    """The messages in the SQS queue ``queue_url``: visible, and received but not yet deleted."""
    try:
        attributes = client("sqs", settings).get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=list(_EVENT_COUNTS)
        )["Attributes"]
    except AWS_ERRORS as exc:
        raise translate(exc, f"reading the events waiting in {queue_url}") from exc
    return sum(int(attributes.get(name, 0)) for name in _EVENT_COUNTS)


def _events_waiting(settings: Settings) -> dict:
    """The reading's events waiting; an unreadable queue leaves them unknown, with a warning."""
    if not settings.events_queue_url:
        return {}
    try:
        return {"events_waiting": events_waiting(settings, settings.events_queue_url)}
    except CelebscanError as exc:
        log.warning("events waiting unknown: %s", exc)
        return {"events_queue_error": str(exc)}


def broker_depth(broker_url: str) -> tuple[int, int]:
    """(messages waiting in the queues: window slots and listing parts, messages delivered and not yet
    acknowledged) in Redis."""
    import redis

    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError("metrics read the queue from Redis; CELERY_BROKER_URL is not a Redis URL")
    connection = redis.Redis.from_url(broker_url, socket_timeout=10)
    try:
        with connection.pipeline(transaction=False) as pipe:
            for queue in (QUEUE, LISTING_QUEUE):  # window slots, and parts of key spaces to list
                for priority in _PRIORITY_STEPS:
                    pipe.llen(queue if priority == 0 else f"{queue}{_PRIORITY_SEPARATOR}{priority}")
            pipe.hlen(_UNACKED_KEY)
            *lengths, unacked = pipe.execute()
    except redis.RedisError as exc:
        raise ConfigurationError(f"cannot read the queue from the broker: {exc}") from exc
    finally:
        connection.close()
    return sum(lengths), unacked


def online_workers(settings: Settings, timeout: float) -> int:
    """Worker nodes that answer a Celery ping within ``timeout`` seconds."""
    app = make_celery(settings)
    try:
        return len(app.control.ping(timeout=timeout) or [])
    finally:
        app.close()


def prometheus_text(reading: Reading) -> str:
    """The reading in Prometheus' text exposition format (for node_exporter's textfile collector)."""
    lines = [
        "# HELP celebscan_images Images of a scan by status (unfinished scans and the latest one).",
        "# TYPE celebscan_images gauge",
    ]
    for scan in reading.scans:
        lines += [
            f'celebscan_images{{scan="{scan.scan_id}",status="{status}"}} {scan.counts[status]}' for status in STATUSES
        ]
    lines += [
        "# HELP celebscan_scan_finished 1 when the scan has finished.",
        "# TYPE celebscan_scan_finished gauge",
        *(f'celebscan_scan_finished{{scan="{scan.scan_id}"}} {int(scan.finished)}' for scan in reading.scans),
        (
            "# HELP celebscan_scan_last_processed_timestamp_seconds When the scan last finished an image: "
            "alert when it stops moving while images are queued."
        ),
        "# TYPE celebscan_scan_last_processed_timestamp_seconds gauge",
        *(
            f'celebscan_scan_last_processed_timestamp_seconds{{scan="{scan.scan_id}"}} '
            f"{scan.last_processed_at.timestamp():.3f}"
            for scan in reading.scans
            if scan.last_processed_at
        ),
        "# HELP celebscan_stale_writes_refused_total Late writes refused: their run had lost its claim.",
        "# TYPE celebscan_stale_writes_refused_total counter",
        f"celebscan_stale_writes_refused_total {reading.refused_writes}",
        "# HELP celebscan_backlog_images Queued images that workers can still receive, and events waiting.",
        "# TYPE celebscan_backlog_images gauge",
        f"celebscan_backlog_images {reading.backlog_images}",
    ]
    if reading.standing:
        lines += [
            "# HELP celebscan_standing_scan_events_total S3 events a standing scan's followers recorded.",
            "# TYPE celebscan_standing_scan_events_total counter",
            *(
                f'celebscan_standing_scan_events_total{{scan="{scan.scan_id}"}} {scan.events}'
                for scan in reading.standing
            ),
            (
                "# HELP celebscan_event_lag_seconds How long the oldest message of a standing scan's last receive "
                "that brought messages had waited in the queue."
            ),
            "# TYPE celebscan_event_lag_seconds gauge",
            *(
                f'celebscan_event_lag_seconds{{scan="{scan.scan_id}"}} {scan.event_lag_seconds:.3f}'
                for scan in reading.standing
                if scan.event_lag_seconds is not None
            ),
            (
                "# HELP celebscan_standing_scan_followed_timestamp_seconds When a follower last renewed the "
                "standing scan: alert when it stops moving."
            ),
            "# TYPE celebscan_standing_scan_followed_timestamp_seconds gauge",
            *(
                f'celebscan_standing_scan_followed_timestamp_seconds{{scan="{scan.scan_id}"}} '
                f"{scan.followed_at.timestamp():.3f}"
                for scan in reading.standing
                if scan.followed_at is not None
            ),
        ]
    if reading.events_queue_url:
        lines += [
            "# HELP celebscan_events_queue_up 1 when the follow queue (CELEBSCAN_EVENTS_QUEUE_URL) could be read.",
            "# TYPE celebscan_events_queue_up gauge",
            f"celebscan_events_queue_up {int(reading.events_waiting is not None)}",
        ]
    if reading.events_waiting is not None:
        lines += [
            "# HELP celebscan_events_waiting S3 events in the follow queue: visible, or received and not deleted.",
            "# TYPE celebscan_events_waiting gauge",
            f"celebscan_events_waiting {reading.events_waiting}",
        ]
    if reading.waiting_batches is not None:
        lines += [
            "# HELP celebscan_broker_batches Batches in the broker: waiting, or delivered and not acknowledged.",
            "# TYPE celebscan_broker_batches gauge",
            f'celebscan_broker_batches{{state="waiting"}} {reading.waiting_batches}',
            f'celebscan_broker_batches{{state="unacked"}} {reading.unacked_batches}',
            "# HELP celebscan_workers Worker nodes answering a ping.",
            "# TYPE celebscan_workers gauge",
            f"celebscan_workers {reading.workers}",
        ]
    return "\n".join(lines) + "\n"


def plain_text(reading: Reading) -> str:
    lines = [f"pending images: {reading.pending_images}", f"stale writes refused: {reading.refused_writes}"]
    for scan in reading.scans:
        state = "finished" if scan.finished else "running"
        counts = ", ".join(f"{scan.counts[status]} {status}" for status in STATUSES)
        lines.append(f"  scan {scan.scan_id} ({state}): {counts}")
    for standing in reading.standing:
        lag = standing.event_lag_seconds
        ago = standing.followed_seconds_ago(reading.taken_at)
        lines.append(
            f"standing scan {standing.scan_id} ({standing.source}, {standing.backend}): {standing.events} events, "
            f"{standing.deletions} deletions; events' lag: "
            + (f"{lag:.1f} s (the oldest message of the last receive)" if lag is not None else "none received yet")
            + "; "
            + (f"a follower renewed it {ago:.0f} s ago" if ago is not None else "no follower renewed it yet")
        )
    if reading.events_queue_url:
        if reading.events_waiting is not None:
            lines.append(f"events waiting in the queue: {reading.events_waiting}")
        else:
            lines.append(f"events waiting in the queue: unknown ({reading.events_queue_error})")
    if reading.waiting_batches is not None:
        lines += [
            f"broker: {reading.waiting_batches} batches waiting, {reading.unacked_batches} being processed"
            + (
                " (window slots of finished scans: each ends when a worker takes it)"
                if reading.waiting_batches and not reading.pending_images
                else ""
            ),
            f"workers online: {reading.workers}",
            f"backlog per worker: {reading.backlog_per_worker:.1f} images",
        ]
    for scan in reading.scans:
        if scan.unserved:
            lines.append(
                f"scan {scan.scan_id} is waiting: no worker has served its batches: {scan.unserved}; "
                f"install what it names on the workers (pip install '.[local]') and restart them"
            )
    for scan_id in reading.repairing_scans:
        lines.append(
            f"scan {scan_id} is being repaired: window slots whose run stopped renewing them (a worker died or "
            "stalled) are sent again by the window's keeper"
        )
    if reading.waiting_batches is not None and reading.pending_images:
        ago = reading.keeper_seconds_ago
        lines.append(
            "window keeper: " + (f"seen {ago:.0f} s ago" if ago is not None else "none yet (no worker has started)")
        )
    for scan_id in reading.stalled_scans:
        lines.append(f"scan {scan_id} is stalled (unfinished, no window slot left): celebscan scan --resume {scan_id}")
    return "\n".join(lines)


FORMATS = {"text": plain_text, "json": lambda reading: json.dumps(reading.as_dict()), "prometheus": prometheus_text}


def publish_to_cloudwatch(reading: Reading, settings: Settings) -> str:
    """Put the reading's scaling figures as custom metrics; returns the namespace used."""
    namespace = settings.cloudwatch_namespace or DEFAULT_NAMESPACE
    figures: dict[str, float | None] = {
        "PendingImages": reading.pending_images,
        "BacklogImages": reading.backlog_images,
        "BacklogPerWorker": reading.backlog_per_worker,
        "QueueLength": reading.broker_batches,
        "WorkersOnline": reading.workers,
        "EventsWaiting": reading.events_waiting,
        "EventLagSeconds": reading.event_lag_seconds,
    }
    try:
        client("cloudwatch", settings).put_metric_data(
            Namespace=namespace,
            MetricData=[  # None: no broker (no queue, no workers), no follow queue, no event received
                {
                    "MetricName": name,
                    "Value": float(value),
                    "Unit": CLOUDWATCH_UNITS[name],
                    "Timestamp": reading.taken_at,
                }
                for name, value in figures.items()
                if value is not None
            ],
        )
    except AWS_ERRORS as exc:
        raise translate(exc, f"publishing metrics to CloudWatch namespace {namespace}") from exc
    return namespace
