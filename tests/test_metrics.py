"""`celebscan metrics` during a real scan: PostgreSQL, Redis, a Celery worker, CloudWatch on moto; and
a followed bucket's standing scans and the events waiting in its SQS queue (moto's)."""

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, update

from producer.s3_events import CREATED
from tests.celery_workers import celery_workers, wait_for_scan
from tests.clirun import celebscan
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from tests.servers import free_port, wait_until
from worker.celery_config import QUEUE
from worker.queue.images import ImageQueue
from worker.queue.objects import ObjectChange, apply_changes
from worker.queue.scans import Scans, renew_follow
from worker.schema import scans, window_slots

pytestmark = pytest.mark.slow

IMAGES, BATCH = 10, 4  # 3 batches: 4 + 4 + 2


def run(env, *args) -> str:
    return celebscan(*args, env=env).stdout


def reading(env) -> dict:
    return json.loads(run(env, "metrics", "--format", "json"))


@pytest.fixture
def scan_env(aws_env, moto_url, rekognition, broker_url, pg_store, s3, bucket):
    for number in range(IMAGES):
        s3.put_object(Bucket=bucket, Key=f"m/{number:02d}.jpg", Body=jpeg(200 + number, 160))
    return {
        **aws_env,
        "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url,
        "AWS_ENDPOINT_URL_CLOUDWATCH": moto_url,
        "CELERY_BROKER_URL": broker_url,
        "CELEBSCAN_DATABASE_URL": pg_store.engine.url.render_as_string(False),
        "CELEBSCAN_BACKEND": "rekognition",
        "CELEBSCAN_BATCH_SIZE": str(BATCH),
        "CELEBSCAN_WINDOW": str(-(-IMAGES // BATCH)),  # as many slots as batches: one look shows each state
        "BUCKET": bucket,
    }


def test_metrics_before_during_and_after_a_scan(scan_env, rekognition, pg_store, tmp_path):
    release = threading.Event()
    rekognition.answer = lambda key, data: release.wait(60) and {"CelebrityFaces": [celebrity("someone")]}
    run(scan_env, "scan", f"s3://{scan_env['BUCKET']}/m/")
    scan_id = pg_store.latest_scan_id()

    before = reading(scan_env)
    assert (
        before["pending_images"],
        before["backlog_images"],
        before["waiting_batches"],
        before["unacked_batches"],
        before["workers"],
    ) == (IMAGES, IMAGES, 3, 0, 0)
    assert before["backlog_per_worker"] == IMAGES  # no worker online: the whole backlog, so 0 scales out

    with celery_workers(1, scan_env, tmp_path):
        wait_until(lambda: rekognition.received > 0, timeout=60, what="the worker's first call")
        during = reading(scan_env)
        assert (during["pending_images"], during["waiting_batches"], during["unacked_batches"], during["workers"]) == (
            IMAGES,
            2,
            1,
            1,
        )
        assert during["backlog_per_worker"] == IMAGES
        assert during["scans"] == [
            {
                "scan_id": scan_id,
                "finished": False,
                "last_processed_at": None,
                "images": {"queued": IMAGES, "done": 0, "failed": 0},
                "unserved": None,
                "window": {"due": 0, "sent": 2, "running": 1, "ended": 0, "repairs": 0, "lapsed": 0},
            }
        ]
        assert during["keeper_seconds_ago"] is not None and during["keeper_seconds_ago"] < 30
        release.set()
        wait_for_scan(pg_store, scan_id, timeout=120)
        wait_until(lambda: reading(scan_env)["waiting_batches"] == 0, timeout=60, what="the window's slots to end")

    after = reading(scan_env)
    assert (after["pending_images"], after["backlog_images"], after["waiting_batches"], after["unacked_batches"]) == (
        0,
        0,
        0,
        0,
    )
    assert after["scans"][0]["finished"] and after["scans"][0]["images"] == {"queued": 0, "done": IMAGES, "failed": 0}
    assert after["stalled_scans"] == []


def test_prometheus_format_a_lost_broker_and_a_stalled_scan(scan_env, broker_url, pg_store):
    run(scan_env, "scan", f"s3://{scan_env['BUCKET']}/m/")
    scan_id = pg_store.latest_scan_id()
    redis.Redis.from_url(broker_url).delete(QUEUE)  # a broker restarted without its data

    families = {
        family.name: family
        for family in text_string_to_metric_families(run(scan_env, "metrics", "--format", "prometheus"))
    }
    images = {sample.labels["status"]: sample.value for sample in families["celebscan_images"].samples}
    assert images == {"queued": IMAGES, "done": 0, "failed": 0}
    assert families["celebscan_backlog_images"].samples[0].value == IMAGES, "the keeper sends its slots again"
    assert {s.labels["state"]: s.value for s in families["celebscan_broker_batches"].samples} == {
        "waiting": 0,
        "unacked": 0,
    }
    assert f"scan {scan_id} is stalled" not in run(scan_env, "metrics")

    with pg_store.engine.begin() as conn:  # a scan made before windows were kept: nothing moves it
        conn.execute(delete(window_slots).where(window_slots.c.scan_id == scan_id))
    stalled = reading(scan_env)
    assert (stalled["stalled_scans"], stalled["backlog_images"]) == ([scan_id], 0)
    text = run(scan_env, "metrics")
    assert f"scan {scan_id} is stalled" in text and f"celebscan scan --resume {scan_id}" in text
    run(scan_env, "scan", "--resume", str(scan_id))
    resumed = reading(scan_env)
    assert (resumed["backlog_images"], resumed["waiting_batches"], resumed["stalled_scans"]) == (IMAGES, 3, [])


def test_cloudwatch_publishing_from_metrics_and_from_scan(scan_env):
    namespace = "Celebscan/test"
    env = {**scan_env, "CELEBSCAN_CLOUDWATCH_NAMESPACE": namespace}
    output = run(env, "scan", f"s3://{scan_env['BUCKET']}/m/")
    assert f"published the backlog to CloudWatch namespace {namespace}" in output
    run(env, "metrics", "--cloudwatch")

    cloudwatch = boto3.client("cloudwatch", endpoint_url=scan_env["AWS_ENDPOINT_URL_CLOUDWATCH"])
    names = {metric["MetricName"] for metric in cloudwatch.list_metrics(Namespace=namespace)["Metrics"]}
    assert names == {"PendingImages", "BacklogImages", "BacklogPerWorker", "QueueLength", "WorkersOnline"}
    now = datetime.now(UTC)
    statistics = cloudwatch.get_metric_statistics(
        Namespace=namespace,
        MetricName="BacklogPerWorker",
        StartTime=now - timedelta(minutes=5),
        EndTime=now + timedelta(minutes=1),
        Period=60,
        Statistics=["Maximum", "SampleCount"],
    )["Datapoints"]
    assert sum(point["SampleCount"] for point in statistics) == 2  # once by scan, once by metrics
    assert max(point["Maximum"] for point in statistics) == IMAGES


# A followed bucket: its open standing scan, and the events waiting in its queue.

FOLLOWED = "s3://followed/photos/"
LAG = 12.5
QUEUED_IN_STANDING = 2
#: Messages in the queue: sent, one of them received and not yet deleted (counted: it is not applied yet).
EVENTS_SENT = 3


@pytest.fixture
def follow_env(aws_env, moto_url, store):
    """A database with an open standing scan (a follower renewed it 30 s ago, its last receive's oldest
    message had waited LAG s), a closed one and an ordinary scan; an SQS queue holding EVENTS_SENT."""
    engine = store.engine
    scan_id, new = Scans(engine).open_standing(FOLLOWED, "rekognition", batch_size=16)
    assert new
    uploads = [
        ObjectChange(CREATED, f"photos/{n}.jpg", f"{n:016x}", f"etag-{n}", 100) for n in range(QUEUED_IN_STANDING)
    ]
    with engine.begin() as conn:  # a receive, as a follower records it
        assert renew_follow(conn, scan_id, LAG)
        apply_changes(conn, ImageQueue(engine, 120), scan_id, "followed", "rekognition", uploads)
        conn.execute(
            update(scans).where(scans.c.id == scan_id).values(followed_at=datetime.now(UTC) - timedelta(seconds=30))
        )
    ended, _ = Scans(engine).open_standing("s3://followed/old/", "rekognition", batch_size=16)
    with engine.begin() as conn:  # nobody followed it for a lease: its listing ended
        conn.execute(update(scans).where(scans.c.id == ended).values(listing_finished_at=datetime.now(UTC)))
    store.create_scan("s3://followed/other/", "rekognition")

    sqs = boto3.client("sqs", endpoint_url=moto_url)
    queue_url = sqs.create_queue(QueueName=f"events-{free_port()}")["QueueUrl"]
    for n in range(EVENTS_SENT):
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"n": n}))
    [_] = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, VisibilityTimeout=600)["Messages"]
    return {
        **aws_env,
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ENDPOINT_URL_CLOUDWATCH": moto_url,
        "CELERY_BROKER_URL": "",  # no broker: the backlog is the queued images, all of them
        "CELEBSCAN_DATABASE_URL": str(engine.url.render_as_string(False)),
        "CELEBSCAN_EVENTS_QUEUE_URL": queue_url,
        "SCAN_ID": str(scan_id),
    }


def test_metrics_report_the_standing_scan_and_the_events_waiting(follow_env):
    before = time.time()
    found = reading(follow_env)
    scan_id = int(follow_env["SCAN_ID"])
    assert found["events_queue_url"] == follow_env["CELEBSCAN_EVENTS_QUEUE_URL"]
    assert (found["events_waiting"], found["events_queue_error"]) == (EVENTS_SENT, None)
    assert found["pending_images"] == QUEUED_IN_STANDING
    assert found["backlog_images"] == QUEUED_IN_STANDING + EVENTS_SENT, "each event waiting is an image to come"
    assert found["backlog_per_worker"] == QUEUED_IN_STANDING + EVENTS_SENT
    assert found["event_lag_seconds"] == LAG
    [standing] = found["standing_scans"]  # not the ended one, nor the ordinary scan
    assert {name: standing[name] for name in ("scan_id", "source", "backend", "events", "event_lag_seconds")} == {
        "scan_id": scan_id,
        "source": FOLLOWED,
        "backend": "rekognition",
        "events": QUEUED_IN_STANDING,
        "event_lag_seconds": LAG,
    }
    assert 30 <= standing["followed_seconds_ago"] < 30 + (time.time() - before) + 5
    assert abs(found["taken_at"] - standing["followed_seconds_ago"] - standing["followed_at"]) < 0.01

    text = run(follow_env, "metrics")
    assert f"standing scan {scan_id} ({FOLLOWED}, rekognition): {QUEUED_IN_STANDING} events, 0 deletions" in text
    assert f"events' lag: {LAG:.1f} s" in text and "a follower renewed it 3" in text, text
    assert f"events waiting in the queue: {EVENTS_SENT}" in text

    families = {
        family.name: family
        for family in text_string_to_metric_families(run(follow_env, "metrics", "--format", "prometheus"))
    }
    [lag] = families["celebscan_event_lag_seconds"].samples
    assert (lag.labels, lag.value) == ({"scan": str(scan_id)}, LAG)
    [followed] = families["celebscan_standing_scan_followed_timestamp_seconds"].samples
    assert abs(followed.value - standing["followed_at"]) < 0.01
    assert families["celebscan_events_queue_up"].samples[0].value == 1
    assert families["celebscan_events_waiting"].samples[0].value == EVENTS_SENT
    assert families["celebscan_backlog_images"].samples[0].value == QUEUED_IN_STANDING + EVENTS_SENT


def test_an_unreachable_queue_leaves_the_events_unknown_and_the_rest_reported(follow_env, caplog):
    env = {**follow_env, "AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="producer.metrics"):
        found = reading(env)
    [warning] = [record for record in caplog.records if record.name == "producer.metrics"]
    assert "events waiting unknown" in warning.getMessage() and "\n" not in warning.getMessage()
    assert found["events_waiting"] is None and env["CELEBSCAN_EVENTS_QUEUE_URL"] in found["events_queue_error"]
    assert found["backlog_images"] == QUEUED_IN_STANDING and found["event_lag_seconds"] == LAG
    assert "events waiting in the queue: unknown (" in run(env, "metrics")
    families = {
        family.name: family for family in text_string_to_metric_families(run(env, "metrics", "--format", "prometheus"))
    }
    assert families["celebscan_events_queue_up"].samples[0].value == 0
    assert "celebscan_events_waiting" not in families


def test_without_a_follow_queue_no_events_are_read(follow_env):
    env = {**follow_env, "CELEBSCAN_EVENTS_QUEUE_URL": "", "AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{free_port()}"}
    found = reading(env)
    assert (found["events_queue_url"], found["events_waiting"], found["events_queue_error"]) == (None, None, None)
    assert found["backlog_images"] == QUEUED_IN_STANDING and len(found["standing_scans"]) == 1
    assert "events waiting" not in run(env, "metrics")


def test_cloudwatch_gets_the_events_waiting_and_their_lag(follow_env):
    namespace = "Celebscan/follow"
    run({**follow_env, "CELEBSCAN_CLOUDWATCH_NAMESPACE": namespace}, "metrics", "--cloudwatch")
    cloudwatch = boto3.client("cloudwatch", endpoint_url=follow_env["AWS_ENDPOINT_URL_CLOUDWATCH"])
    names = {metric["MetricName"] for metric in cloudwatch.list_metrics(Namespace=namespace)["Metrics"]}
    assert names == {"PendingImages", "BacklogImages", "BacklogPerWorker", "EventsWaiting", "EventLagSeconds"}
    now = datetime.now(UTC)

    def maximum(name: str) -> float:
        [point] = cloudwatch.get_metric_statistics(
            Namespace=namespace,
            MetricName=name,
            StartTime=now - timedelta(minutes=5),
            EndTime=now + timedelta(minutes=1),
            Period=600,
            Statistics=["Maximum"],
        )["Datapoints"]
        return point["Maximum"]

    assert maximum("EventsWaiting") == EVENTS_SENT
    assert maximum("EventLagSeconds") == LAG
    assert maximum("BacklogImages") == QUEUED_IN_STANDING + EVENTS_SENT
