"""`celebscan metrics` during a real scan: PostgreSQL, Redis, a Celery worker, CloudWatch on moto."""

import json
import threading
from datetime import UTC, datetime, timedelta

import boto3
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.celery_workers import celery_workers, wait_for_scan
from tests.clirun import celebscan
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from tests.servers import wait_until
from worker.celery_config import QUEUE

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
            }
        ]
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


def test_prometheus_format_and_stalled_scan(scan_env, broker_url, pg_store):
    run(scan_env, "scan", f"s3://{scan_env['BUCKET']}/m/")
    scan_id = pg_store.latest_scan_id()
    redis.Redis.from_url(broker_url).delete(QUEUE)  # a broker restarted without its data

    families = {
        family.name: family
        for family in text_string_to_metric_families(run(scan_env, "metrics", "--format", "prometheus"))
    }
    images = {sample.labels["status"]: sample.value for sample in families["celebscan_images"].samples}
    assert images == {"queued": IMAGES, "done": 0, "failed": 0}
    assert families["celebscan_backlog_images"].samples[0].value == 0
    assert {s.labels["state"]: s.value for s in families["celebscan_broker_batches"].samples} == {
        "waiting": 0,
        "unacked": 0,
    }

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
