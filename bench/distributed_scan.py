"""Distributed scan throughput: N images from moto's S3, through Redis, to 2 Celery worker processes,
against the Rekognition stand-in with no latency, into PostgreSQL.

Prints the producer's enqueue rate (keys/s, listing excluded) and the end-to-end images/s.

    python -m bench.distributed_scan [--images 500] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from producer.enqueue import enqueue_batches
from producer.listing import parse_source
from producer.scan import plan_scan, split_batches
from tests.celery_workers import celery_workers, wait_for_scan
from tests.conftest import AWS_TEST_ENV
from tests.imagemaker import jpeg
from tests.rekognition_standin import RekognitionStandIn, celebrity
from tests.servers import free_port, postgres_server, redis_server
from worker.settings import Settings
from worker.store import ResultStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    with ExitStack() as stack:
        postgres_url = stack.enter_context(postgres_server())
        redis_url = stack.enter_context(redis_server())
        moto_port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
        moto.start()
        stack.callback(moto.stop)
        moto_url = f"http://127.0.0.1:{moto_port}"
        os.environ.update(AWS_TEST_ENV, AWS_ENDPOINT_URL_S3=moto_url)
        standin = stack.enter_context(RekognitionStandIn(
            s3_endpoint=moto_url, answer=lambda key, data: {"CelebrityFaces": [celebrity("someone")]}))

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bench")
        body = jpeg(320, 240)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket="bench", Key=f"p{i % 8}/img{i:06d}.jpg", Body=body),
                          range(args.images)))

        env = {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": moto_url, "AWS_ENDPOINT_URL_REKOGNITION": standin.url,
               "CELERY_BROKER_URL": redis_url, "CELEBSCAN_DATABASE_URL": postgres_url,
               "CELEBSCAN_BACKEND": "rekognition", "CELEBSCAN_BATCH_SIZE": str(args.batch_size)}
        settings = Settings.from_env(env)
        store = ResultStore.connect(postgres_url)

        started = time.perf_counter()
        planned = plan_scan(store, parse_source("s3://bench/"), settings)
        planned_at = time.perf_counter()
        batches = split_batches(planned.queue.image_ids, settings.batch_size, 1, balance=False)
        enqueue_batches(settings, batches)
        enqueued_at = time.perf_counter()
        keys = len(planned.queue.image_ids)
        print(f"listing + recording {keys} images: {planned_at - started:.2f} s")
        print(f"enqueue: {keys / (enqueued_at - planned_at):,.0f} keys/s ({len(batches)} messages)")

        logs = Path(tempfile.mkdtemp(prefix="celebscan-bench-"))
        with celery_workers(args.workers, env, logs):
            first = time.perf_counter()
            wait_for_scan(store, planned.scan_id, timeout=1800)
            elapsed = time.perf_counter() - first
        summary = store.scan_summary(planned.scan_id)
        assert summary.counts["done"] == args.images, summary.counts
        print(f"scan: {args.images} images with {args.workers} worker processes in {elapsed:.1f} s "
              f"(worker start-up included) = {args.images / elapsed:.1f} images/s; "
              f"{len(standin.calls)} Rekognition calls")


if __name__ == "__main__":
    main()
