"""Following a living bucket (issue 21): how soon an upload has its result, and how fast a backlog drains.

Every part is real and on this machine (``tests/stack.py``): PostgreSQL, Redis, moto's server (S3,
and SQS, which moto's S3 sends the bucket's event notifications to once ``celebscan follow
--setup`` configured them), the Rekognition stand-in answering each call after ``--latency`` s (1 s,
as Rekognition does) within a quota of ``--quota`` calls/s, one Celery worker node started as the
Procfile says (2 prefork processes, ``CELEBSCAN_REKOGNITION_TPS`` = the quota so they pace
themselves), and ``celebscan follow s3://BUCKET/photos/ --queue URL`` as a subprocess. Each part
runs on a fresh stack.

1. Latency: distinct JPEGs uploaded at ``--rate`` (20) a second for ``--seconds`` (300), after a
   warm-up of 3 uploads (worker start-up left out). For each upload: from PutObject returning to
   its image row being ``done`` (``images.processed_at``; both wall clock, UTC). Prints p50, p95,
   max and the count; goal p95 <= 5 s. Baseline, same process: the follower stopped, 20 more
   uploads, then a full ``celebscan scan`` of the same source (listing every object, skipping the
   done ones by ETag) started at once: the same figures for those uploads, the best a rescan can
   do (a periodic rescan adds the wait for its next run).
2. Burst drain: ``--burst`` (50,000) objects put with no notification configured, then
   ``follow --setup``, then one S3 event message per object (S3's JSON shape, the objects' real
   ETags and sizes) sent to the queue with ``send_message_batch`` (putting them one by one through
   moto's notifications would take far longer); then the worker and ``follow`` start. Prints the
   drain rate from the first result to the last against the quota (goal >= 95%), the broker's
   length sampled every 0.5 s (Redis ``LLEN`` of the celery queues, and with the window slots
   waiting out their countdown in the worker: ``unacked``; goal: within the window of 32 slots),
   and the follower's RSS at the first and the last result (goal: flat, within 10%).
   moto's SQS server, in this process, scans its whole queue on every receive and delete: with
   50,000 messages waiting it hands out ~15-17 a second with one core busy (the follower then
   waits on it, with next to nothing queued in the database), so a burst of 10,000 measures
   celebscan rather than moto on a 2-core machine; ``--feed-rate 100`` sends the events while
   follow runs, at twice the quota, so 50,000 build their backlog in the database instead.

Exits 1 when a goal is missed.

    python -m bench.follow [--seconds 300] [--rate 20] [--burst 50000] [--feed-rate 0] [--quota 50]
        [--latency 1.0] [--skip-latency] [--skip-burst]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import redis
from botocore.config import Config
from sqlalchemy import func, select

from tests.celery_workers import celery_workers
from tests.imagemaker import jpeg, jpeg_with_comment
from tests.stack import Stack, fill_bucket, start_stack
from worker.celery_config import LISTING_QUEUE, QUEUE
from worker.schema import DONE, images
from worker.store import ResultStore

PREFIX = "photos/"
#: A standing scan's window (producer/follow.py FOLLOW_WINDOW).
WINDOW = 32
#: A slot's message is sent on before its own is acknowledged (acks late): one more per worker process.
BROKER_BOUND = WINDOW + 2
LATENCY_GOAL_SECONDS = 5.0
DRAIN_GOAL_SHARE = 0.95
RSS_GOAL_GROWTH = 0.10
BASELINE_UPLOADS = 20
WARM_UP_UPLOADS = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=300, help="latency: seconds of uploads")
    parser.add_argument("--rate", type=float, default=20.0, help="latency: uploads per second")
    parser.add_argument("--burst", type=int, default=50_000, help="burst: events waiting before follow starts")
    parser.add_argument("--quota", type=float, default=50.0, help="the stand-in's quota, calls/s")
    parser.add_argument(
        "--feed-rate",
        type=float,
        default=0.0,
        help="burst: send the events at this rate while follow runs, instead of all before (moto's SQS slows "
        "with every message waiting: 50,000 waiting at once are served at ~15/s)",
    )
    parser.add_argument("--latency", type=float, default=1.0, help="the stand-in's answer time, s")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="celebscan-follow-"))
    print(f"machine: {os.cpu_count()} cores, load average {load()} at the start; logs in {logs}", flush=True)
    met = True
    if not args.skip_latency:
        met &= measure_latency(args, logs)
    if not args.skip_burst:
        met &= measure_burst(args, logs)
    print(f"load average {load()} at the end")
    print("OK" if met else "MISSED")
    return 0 if met else 1


def measure_latency(args: argparse.Namespace, logs: Path) -> bool:
    bucket = "live"
    with ExitStack() as stack:
        parts = start_stack(stack, delay=args.latency, quota_tps=args.quota)
        env = follow_env(parts, args.quota)
        boto3.client("s3").create_bucket(Bucket=bucket)
        queue_url = set_up(bucket, env)
        store = ResultStore.connect(parts.postgres_url)
        stack.callback(store.engine.dispose)
        uploader = Uploader(bucket)
        with celery_workers(1, env, logs, concurrency=2, name="latency-worker"):
            with following(bucket, queue_url, env, logs / "latency-follow.log"):
                warm_up = uploader.put([f"{PREFIX}warm-up-{n}.jpg" for n in range(WARM_UP_UPLOADS)])
                wait_done(store, bucket, f"{PREFIX}warm-up-%", len(warm_up), timeout=300)
                count = int(args.seconds * args.rate)
                print(
                    f"\nlatency: {count} distinct JPEGs uploaded at {args.rate:g}/s for {args.seconds} s "
                    f"(after {WARM_UP_UPLOADS} warm-up uploads), 1 worker node x 2 processes, stand-in "
                    f"{args.latency:g} s a call, quota {args.quota:g}/s, load average {load()}",
                    flush=True,
                )
                started = time.monotonic()
                put_at = uploader.put_at_rate([f"{PREFIX}live-{n:06d}.jpg" for n in range(count)], args.rate)
                achieved = count / (time.monotonic() - started)
                done = wait_done(store, bucket, f"{PREFIX}live-%", count, timeout=300)
            print(f"  uploads: {achieved:.2f}/s achieved, PutObject p50 {ms(uploader.put_seconds)}")
            followed = summarize(put_at, done)
            print(f"  follow, PutObject returned -> result done: {followed}")

            # The baseline: the follower stopped, a rescan of the whole source gives the new uploads their results.
            baseline_put = uploader.put([f"{PREFIX}rescan-{n:03d}.jpg" for n in range(BASELINE_UPLOADS)])
            scan_started = time.monotonic()
            scan = subprocess.run(
                [sys.executable, "-m", "producer.cli", "scan", f"s3://{bucket}/{PREFIX}", "--backend", "rekognition"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=600,
            )
            returned = time.monotonic() - scan_started
            if scan.returncode != 0:
                raise RuntimeError(f"celebscan scan failed: {scan.stdout}{scan.stderr}")
            baseline_done = wait_done(store, bucket, f"{PREFIX}rescan-%", BASELINE_UPLOADS, timeout=600)
            scanned = time.monotonic() - scan_started
        rescanned = summarize(baseline_put, baseline_done)
        listed = count + WARM_UP_UPLOADS + BASELINE_UPLOADS
        print(
            f"  baseline, a rescan: `celebscan scan s3://{bucket}/{PREFIX} --backend rekognition` started right after "
            f"{BASELINE_UPLOADS} more uploads ({listed} objects listed, the done ones skipped by ETag; the command "
            f"returned after {returned:.1f} s, its new images done {scanned:.1f} s after it started): {rescanned}"
        )
    p95 = followed.p95
    met = p95 <= LATENCY_GOAL_SECONDS and followed.missing == 0
    print(
        f"  follow p95 {p95:.2f} s vs the rescan's {rescanned.p95:.2f} s = {rescanned.p95 / p95:.1f}x sooner; "
        f"goal p95 <= {LATENCY_GOAL_SECONDS:g} s, none missing: {'✔' if met else '✘'}",
        flush=True,
    )
    return met


def measure_burst(args: argparse.Namespace, logs: Path) -> bool:
    bucket, total = "burst", args.burst
    with ExitStack() as stack:
        parts = start_stack(stack, delay=args.latency, quota_tps=args.quota)
        env = follow_env(parts, args.quota)
        print(f"\nburst: {total} objects, load average {load()}", flush=True)
        started = time.monotonic()
        keys = [f"{PREFIX}b{n:06d}.jpg" for n in range(total)]
        fill_bucket(bucket, keys, jpeg(200, 150))
        print(f"  {total} distinct JPEGs put (no notification configured yet) in {time.monotonic() - started:.0f} s")
        queue_url = set_up(bucket, env)
        speed_up_moto_sqs()
        sqs = boto3.client("sqs", endpoint_url=parts.moto_url)
        feeder = None
        if args.feed_rate:  # events arrive faster than the quota while follow runs: the backlog is in the database
            feeder = threading.Thread(
                target=lambda: send_events(bucket, queue_url, parts.moto_url, rate=args.feed_rate), daemon=True
            )
            print(
                f"  {total} S3 event messages (S3's JSON, one record each, real ETags and sizes) sent to the queue "
                f"with send_message_batch at {args.feed_rate:g}/s ({args.feed_rate / args.quota:.1f}x the quota) "
                f"while follow runs, not by moto's notifications (moto's SQS slows with every message waiting)",
                flush=True,
            )
        else:
            started = time.monotonic()
            with moto_counts_unread():
                sent = send_events(bucket, queue_url, parts.moto_url)
            print(
                f"  {sent} S3 event messages (S3's JSON, one record each, real ETags and sizes) sent to the queue "
                f"with send_message_batch in {time.monotonic() - started:.0f} s, not by moto's notifications (and "
                f"moto's SQS made linear in this process: see speed_up_moto_sqs); "
                f"{waiting(sqs, queue_url)} waiting when follow starts",
                flush=True,
            )
        store = ResultStore.connect(parts.postgres_url)
        stack.callback(store.engine.dispose)
        broker = redis.Redis.from_url(parts.redis_url)
        with celery_workers(1, env, logs, concurrency=2, name="burst-worker"):
            with following(bucket, queue_url, env, logs / "burst-follow.log") as follower:
                sampler = Sampler(broker, follower.pid)
                sampler.start()
                if feeder is not None:
                    feeder.start()
                try:
                    drain_started, follow_started = time.monotonic(), datetime.now(UTC)
                    timeout = max(900.0, 4 * total / args.quota)
                    wait_done(store, bucket, f"{PREFIX}%", total, timeout=timeout, progress=True)
                    drained_in = time.monotonic() - drain_started
                finally:
                    sampler.stop()
                events_left = waiting(sqs, queue_url)
        times = done_times(store, bucket, f"{PREFIX}%")
        recorded = recorded_times(store, bucket, f"{PREFIX}%")
    rejected = sum(c.answered == "ProvisionedThroughputExceededException" for c in parts.standin.calls)
    moments = sorted(times.values())
    first, last = moments[0], moments[-1]
    rate = (len(moments) - 1) / (last - first).total_seconds()
    share = rate / args.quota
    rss_first, rss_last = sampler.rss_at(first), sampler.rss_at(last)
    queued_max = max(sampler.queued, default=0)
    held_max = max(sampler.held, default=0)
    growth = rss_last / rss_first - 1
    applied_in = (max(recorded.values()) - follow_started).total_seconds()
    print(
        f"  follow recorded all {len(recorded)} events in the standing scan within {applied_in:.0f} s of its start "
        f"({len(recorded) / applied_in:.0f} events/s); all {len(moments)} done {drained_in:.0f} s after it started; "
        f"{events_left} messages left in SQS"
    )
    last_recorded = max(recorded.values())
    while_recording = [moment for moment in moments if moment <= last_recorded]
    after = [moment for moment in moments if moment > last_recorded]
    print(
        f"  of which: {phase_rate(while_recording)} while follow was still recording events (its receives, "
        f"moto's SQS and the workers sharing the 2 cores), {phase_rate(after)} after"
    )
    print(
        f"  drain rate, first result to last: {rate:.2f} images/s against the quota of {args.quota:g} calls/s "
        f"= {share:.1%} (goal >= {DRAIN_GOAL_SHARE:.0%}: {'✔' if share >= DRAIN_GOAL_SHARE else '✘'}); "
        f"{rejected} of {len(parts.standin.calls)} calls rejected for quota"
    )
    print(
        f"  broker, sampled every 0.5 s ({len(sampler.queued)} samples): LLEN of {QUEUE} + {LISTING_QUEUE} at most "
        f"{queued_max}; with the slots a worker holds (unacked) at most {held_max} "
        f"(goal <= the window of {WINDOW} + one slot per worker process, sent on before its own is "
        f"acknowledged: {'✔' if held_max <= BROKER_BOUND else '✘'})"
    )
    print(
        f"  follower RSS: {rss_first / 2**20:.1f} MB at the first result, {rss_last / 2**20:.1f} MB at the last "
        f"({growth:+.1%}; max {max(sampler.rss) / 2**20:.1f} MB) (goal: flat, within {RSS_GOAL_GROWTH:.0%}: "
        f"{'✔' if growth <= RSS_GOAL_GROWTH else '✘'})",
        flush=True,
    )
    return share >= DRAIN_GOAL_SHARE and held_max <= BROKER_BOUND and growth <= RSS_GOAL_GROWTH


def phase_rate(moments: list[datetime]) -> str:
    if len(moments) < 2:
        return "no results"
    seconds = (moments[-1] - moments[0]).total_seconds()
    return f"{(len(moments) - 1) / seconds:.1f} images/s ({len(moments)} results)" if seconds > 0 else "no time"


def speed_up_moto_sqs() -> None:
    """moto's SQS (5.x) reads the queue's whole attributes, counting every message three times with a
    ``datetime`` each, for every message it sends and every message it returns from a receive:
    quadratic in the queue's length (at 2,000 messages waiting a receive took 2 s, at 50,000 it
    would take a minute). Its server runs in this process: the retention check reads the retention
    period itself, and "now" is ``time.time()`` (the same values)."""
    import moto.sqs.models as sqs_models

    slow_unix_time = sqs_models.unix_time

    def unix_time(dt: datetime | None = None) -> float:
        return time.time() if dt is None else slow_unix_time(dt)

    def retained(backend, queue_name: str, message) -> bool:
        period = int(backend.get_queue(queue_name).message_retention_period)
        return period + message.sent_timestamp / 1000 > time.time()

    sqs_models.unix_time = unix_time
    sqs_models.unix_time_millis = lambda dt=None: unix_time(dt) * 1000.0
    setattr(sqs_models.SQSBackend, "is_message_valid_based_on_retention_period", retained)  # noqa: B010


@contextmanager
def moto_counts_unread() -> Iterator[None]:
    """While the bench sends the events (nobody reads the queue's counts): moto's send reads one
    attribute of the queue by computing all of them, counting every message."""
    import moto.sqs.models as sqs_models

    names = [f"approximate_number_of_messages{tail}" for tail in ("", "_delayed", "_not_visible")]
    saved = {name: getattr(sqs_models.Queue, name) for name in names}
    for name in names:
        setattr(sqs_models.Queue, name, property(lambda queue: 0))
    try:
        yield
    finally:
        for name, counted in saved.items():
            setattr(sqs_models.Queue, name, counted)


def follow_env(parts: Stack, quota: float) -> dict[str, str]:
    """The workers' and the follower's environment: every part, SQS and STS at moto, paced to the quota."""
    return parts.worker_env(
        AWS_ENDPOINT_URL_SQS=parts.moto_url,
        AWS_ENDPOINT_URL_STS=parts.moto_url,
        CELEBSCAN_REKOGNITION_TPS=str(quota),
        CELEBSCAN_MAX_ATTEMPTS="20",
        CELEBSCAN_WORKER_CONCURRENCY="2",
    )


def set_up(bucket: str, env: dict[str, str]) -> str:
    """``celebscan follow s3://BUCKET/photos/ --setup``: the queue's URL."""
    said = subprocess.run(
        [sys.executable, "-m", "producer.cli", "follow", f"s3://{bucket}/{PREFIX}", "--setup"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [url] = [line.split(": ", 1)[1] for line in said.splitlines() if line.startswith("queue: ")]
    return url


@contextmanager
def following(bucket: str, queue_url: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``celebscan follow s3://BUCKET/photos/ --queue URL`` as a subprocess, stopped with SIGTERM at exit."""
    command = [sys.executable, "-m", "producer.cli", "follow", f"s3://{bucket}/{PREFIX}", "--queue", queue_url]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while b"the workers take its images" not in log.read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"follow did not start: {log.read_text()}")
                time.sleep(0.1)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    stopped = [line for line in log.read_text().splitlines() if line.startswith("stopped: ")]
    print(f"  follow {stopped[0] if stopped else 'ended without saying what it did'}")


class Uploader:
    """Distinct JPEGs (the same pixels, a comment naming the key) put into ``bucket``."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.s3 = boto3.client("s3", config=Config(max_pool_connections=16))
        self.picture = jpeg(200, 150)
        self.put_seconds: list[float] = []
        self.lock = threading.Lock()

    def put_one(self, key: str) -> datetime:
        body = jpeg_with_comment(self.picture, key)
        started = time.monotonic()
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
        returned = datetime.now(UTC)
        with self.lock:
            self.put_seconds.append(time.monotonic() - started)
        return returned

    def put(self, keys: list[str]) -> dict[str, datetime]:
        with ThreadPoolExecutor(8) as pool:
            return dict(zip(keys, pool.map(self.put_one, keys), strict=True))

    def put_at_rate(self, keys: list[str], rate: float) -> dict[str, datetime]:
        """Each key put at its turn (``rate`` a second), on threads so a slow put delays no other."""
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            futures = {}
            for n, key in enumerate(keys):
                time.sleep(max(0.0, start + n / rate - time.monotonic()))
                futures[key] = pool.submit(self.put_one, key)
            return {key: future.result() for key, future in futures.items()}


def send_events(bucket: str, queue_url: str, sqs_url: str, rate: float = 0.0) -> int:
    """One S3 ObjectCreated:Put notification per object under the prefix, as S3 sends them: all at
    once, or ``rate`` a second (a load generator's pacing, batches of 10)."""
    s3 = boto3.client("s3")
    objects = [
        thing
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX)
        for thing in page.get("Contents", [])
    ]
    sqs = boto3.client("sqs", endpoint_url=sqs_url, config=Config(max_pool_connections=8))

    def message(n: int, thing: dict) -> dict:
        record = {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": thing["LastModified"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AWS:BENCH"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {"x-amz-request-id": f"{n:016X}", "x-amz-id-2": "bench"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "celebscan",
                "bucket": {"name": bucket, "ownerIdentity": {"principalId": "BENCH"}, "arn": f"arn:aws:s3:::{bucket}"},
                "object": {
                    "key": quote_plus(thing["Key"], safe="/"),
                    "size": thing["Size"],
                    "eTag": thing["ETag"].strip('"'),
                    "sequencer": f"00{n:016X}",
                },
            },
        }
        return {"Id": str(n % 10), "MessageBody": json.dumps({"Records": [record]})}

    entries = [message(n, thing) for n, thing in enumerate(objects)]
    batches = [entries[n : n + 10] for n in range(0, len(entries), 10)]

    def send(batch: list[dict]) -> int:
        failed = sqs.send_message_batch(QueueUrl=queue_url, Entries=batch).get("Failed", [])
        if failed:
            raise RuntimeError(f"send_message_batch failed: {failed}")
        return len(batch)

    if rate:
        started = time.monotonic()
        for n, batch in enumerate(batches):
            send(batch)
            time.sleep(max(0.0, started + (n + 1) * 10 / rate - time.monotonic()))
        return len(entries)
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(send, batches))


def waiting(sqs, queue_url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return sum(int(attributes[name]) for name in names)


def done_count(store: ResultStore, bucket: str, like: str) -> int:
    """How many keys of ``bucket`` matching ``like`` (SQL LIKE) are done."""
    with store.engine.connect() as conn:
        query = select(func.count(func.distinct(images.c.key))).where(
            images.c.bucket == bucket, images.c.status == DONE, images.c.key.like(like)
        )
        return conn.execute(query).scalar_one()


def done_times(store: ResultStore, bucket: str, like: str) -> dict[str, datetime]:
    """When each key matching ``like`` was first done (``processed_at``, UTC)."""
    with store.engine.connect() as conn:
        query = (
            select(images.c.key, func.min(images.c.processed_at))
            .where(images.c.bucket == bucket, images.c.status == DONE, images.c.key.like(like))
            .group_by(images.c.key)
        )
        return {key: processed_at.astimezone(UTC) for key, processed_at in conn.execute(query)}


def recorded_times(store: ResultStore, bucket: str, like: str) -> dict[str, datetime]:
    """When each key matching ``like`` was first recorded (``queued_at``, UTC)."""
    with store.engine.connect() as conn:
        query = (
            select(images.c.key, func.min(images.c.queued_at))
            .where(images.c.bucket == bucket, images.c.key.like(like))
            .group_by(images.c.key)
        )
        return {key: queued_at.astimezone(UTC) for key, queued_at in conn.execute(query) if queued_at is not None}


def wait_done(
    store: ResultStore, bucket: str, like: str, expected: int, timeout: float, progress: bool = False
) -> dict[str, datetime]:
    """Polls (every 0.5 s) until ``expected`` keys matching ``like`` are done, or ``timeout`` s pass;
    then when each was done."""
    deadline, said = time.monotonic() + timeout, time.monotonic()
    while (done := done_count(store, bucket, like)) < expected and time.monotonic() < deadline:
        if progress and time.monotonic() - said >= 60:
            print(f"    {done} of {expected} done, load average {load()}", flush=True)
            said = time.monotonic()
        time.sleep(0.5)
    return done_times(store, bucket, like)


@dataclass(frozen=True)
class Latencies:
    seconds: list[float]
    missing: int

    @property
    def p95(self) -> float:
        return percentile(self.seconds, 95)

    def __str__(self) -> str:
        if not self.seconds:
            return f"no result ({self.missing} missing)"
        return (
            f"p50 {percentile(self.seconds, 50):.2f} s, p95 {self.p95:.2f} s, max {max(self.seconds):.2f} s, "
            f"count {len(self.seconds)}" + (f", {self.missing} without a result" if self.missing else "")
        )


def summarize(put_at: dict[str, datetime], done: dict[str, datetime]) -> Latencies:
    seconds = [(done[key] - put).total_seconds() for key, put in put_at.items() if key in done]
    return Latencies(seconds, len(put_at) - len(seconds))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("inf")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


@dataclass
class Sampler:
    """Every 0.5 s: the broker's queues, the slots workers hold, the follower's RSS."""

    broker: redis.Redis
    follower: int  # its pid
    moments: list[datetime] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                rss = resident_bytes(self.follower)
            except OSError:  # the follower ended
                return
            with self.broker.pipeline() as pipe:
                pipe.llen(QUEUE)
                pipe.llen(LISTING_QUEUE)
                pipe.hlen("unacked")
                queued, listing, unacked = pipe.execute()
            self.moments.append(datetime.now(UTC))
            self.queued.append(queued + listing)
            self.held.append(queued + listing + unacked)
            self.rss.append(rss)

    def rss_at(self, moment: datetime) -> int:
        """The follower's RSS sampled nearest ``moment``."""
        nearest = min(range(len(self.moments)), key=lambda n: abs((self.moments[n] - moment).total_seconds()))
        return self.rss[nearest]


def ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.0f} ms" if seconds else "-"


def load() -> str:
    return " ".join(f"{each:.2f}" for each in os.getloadavg())


def resident_bytes(pid: int) -> int:
    """A process's resident memory (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
