"""The database as the queue of record, the broker as a bounded window onto it, at scale.

A synthetic bucket (``tests/synthetic_s3.py``) of tens of thousands of objects, real Redis, real
PostgreSQL, real Celery worker processes and the Rekognition stand-in reading from that bucket.
"""

from __future__ import annotations

import threading

import pytest
import redis
from sqlalchemy import func, select

from tests.celery_workers import celery_workers
from tests.clirun import celebscan
from tests.conftest import AWS_TEST_ENV, _reset_postgres
from tests.rekognition_standin import RekognitionStandIn, celebrity
from tests.servers import wait_until
from tests.synthetic_s3 import SyntheticBucket, serving
from worker.celery_config import QUEUE
from worker.schema import images, scans
from worker.store import ResultStore

pytestmark = pytest.mark.slow


@pytest.fixture
def synthetic(request):
    """A synthetic S3 endpoint with the buckets the test names via ``indirect`` parameters."""
    with serving(request.param) as (url, stats):
        yield url, stats


def scan_env(s3_url: str, rekognition_url: str, broker_url: str, postgres_url: str, **extra: str) -> dict:
    return {
        **AWS_TEST_ENV,
        "AWS_ENDPOINT_URL_S3": s3_url,
        "AWS_ENDPOINT_URL_REKOGNITION": rekognition_url,
        "CELERY_BROKER_URL": broker_url,
        "CELEBSCAN_DATABASE_URL": postgres_url,
        **extra,
    }


@pytest.mark.parametrize("synthetic", [[SyntheticBucket("slow", 12_000, prefixes=0, page_delay=1.0)]], indirect=True)
def test_workers_finish_images_while_the_listing_is_still_going(synthetic, broker_url, postgres_url, tmp_path):
    url, _ = synthetic
    _reset_postgres(postgres_url)
    store = ResultStore.connect(postgres_url)
    with RekognitionStandIn(s3_endpoint=url) as rekognition:
        rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
        env = scan_env(url, rekognition.url, broker_url, postgres_url, CELEBSCAN_LISTING_PARTS="4")
        with celery_workers(1, env, tmp_path, concurrency=2):
            output = celebscan("scan", "s3://slow/", "--backend", "rekognition", env=env).output
            assert "listing s3://slow/ on the workers" in output
            scan_id = store.latest_scan_id()
            wait_until(lambda: store.summary(scan_id).listing == "listed", timeout=300, what="the listing to end")
            assert store.summary(scan_id).listed == 12_000
            with store.engine.connect() as conn:
                listing_ended = conn.execute(select(scans.c.listing_finished_at)).scalar_one()
                done_before = conn.execute(
                    select(func.count()).where(images.c.status == "done", images.c.processed_at < listing_ended)
                ).scalar_one()
    print(f"\nimages done while the 12 s listing went on: {done_before}")
    assert done_before > 0, "work must start while the listing goes on"
    store.engine.dispose()


@pytest.mark.parametrize("synthetic", [[SyntheticBucket("wide", 20_000, prefixes=20)]], indirect=True)
def test_the_broker_never_holds_more_than_the_window(synthetic, broker_url, postgres_url, tmp_path):
    url, _ = synthetic
    _reset_postgres(postgres_url)
    client = redis.Redis.from_url(broker_url)
    samples: list[tuple[int, int]] = []
    listing = threading.Event()

    def watch_the_broker() -> None:
        while not listing.is_set():
            with client.pipeline(transaction=False) as pipe:
                samples.append(tuple(pipe.llen(QUEUE).hlen("unacked").execute()))
            listing.wait(0.01)

    store = ResultStore.connect(postgres_url)
    with RekognitionStandIn(s3_endpoint=url) as rekognition:
        rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
        env = scan_env(url, rekognition.url, broker_url, postgres_url, CELEBSCAN_WINDOW="8")
        with celery_workers(1, env, tmp_path, concurrency=2):
            watcher = threading.Thread(target=watch_the_broker, daemon=True)
            watcher.start()
            output = celebscan("scan", "s3://wide/", "--backend", "rekognition", env=env).output
            scan_id = store.latest_scan_id()
            wait_until(lambda: store.summary(scan_id).processed >= 200, timeout=120, what="200 images done")
            listing.set()
            watcher.join()
            memory = client.info("memory")["used_memory"]
    assert "on the workers" in output and "at most 8 at a time" in output
    waiting = max(waiting for waiting, _ in samples)
    in_the_broker = max(waiting + unacked for waiting, unacked in samples)
    print(
        f"\n{len(samples)} looks at the broker: at most {waiting} slots waiting, {in_the_broker} in all; "
        f"Redis uses {memory / 1e6:.1f} MB with 20,000 images queued"
    )
    assert waiting <= 8 and in_the_broker <= 8 + 2, "a slot in hand may be sent on before it is acknowledged"
    assert memory < 8e6
    assert store.summary(scan_id).counts["queued"] > 0, "the test looked while the work went on"
    store.engine.dispose()


@pytest.mark.parametrize("synthetic", [[SyntheticBucket("killed", 12_000, prefixes=0, page_delay=1.0)]], indirect=True)
def test_a_worker_node_killed_while_it_lists_loses_and_doubles_nothing(synthetic, broker_url, postgres_url, tmp_path):
    """The key space is listed by two worker nodes; one is SIGKILLed (its pool too) mid-listing. Its
    parts' messages come back after the visibility timeout and list on after their last page."""
    import os
    import signal

    from tests.celery_workers import pool_children

    url, _ = synthetic
    _reset_postgres(postgres_url)
    store = ResultStore.connect(postgres_url)
    with RekognitionStandIn(s3_endpoint=url) as rekognition:
        rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
        env = scan_env(
            url,
            rekognition.url,
            broker_url,
            postgres_url,
            CELEBSCAN_LISTING_PARTS="4",
            CELEBSCAN_VISIBILITY_TIMEOUT="5",
            CELEBSCAN_LEASE_SECONDS="5",
            CELEBSCAN_BATCH_SIZE="50",
        )
        with celery_workers(2, env, tmp_path, concurrency=2) as nodes:
            output = celebscan("scan", "s3://killed/", "--backend", "rekognition", env=env).output
            assert "listing s3://killed/ on the workers" in output
            scan_id = store.latest_scan_id()
            wait_until(lambda: store.summary(scan_id).listed >= 1000, timeout=120, what="the first pages")
            for pid in pool_children(nodes[0]) + [nodes[0].pid]:
                os.kill(pid, signal.SIGKILL)
            listed_at_the_kill = store.summary(scan_id).listed
            wait_until(lambda: store.summary(scan_id).listing == "listed", timeout=300, what="the listing to end")
    summary = store.summary(scan_id)
    with store.engine.connect() as conn:
        rows, keys = conn.execute(select(func.count(), func.count(func.distinct(images.c.key)))).one()
    print(f"\nkilled a node at {listed_at_the_kill} of 12,000 listed; then listed {summary.listed}, {rows} rows")
    assert listed_at_the_kill < 12_000, "the node was killed while the workers listed"
    assert summary.listed == rows == keys == 12_000
    assert summary.listing == "listed" and summary.listing_parts[0] == summary.listing_parts[1]
    store.engine.dispose()
