"""Distributed scan throughput: N images from moto's S3, through Redis, to 2 Celery worker processes,
against the Rekognition stand-in with no latency, into PostgreSQL.

Prints the producer's enqueue rate (keys/s, listing excluded) and the end-to-end images/s.

    python -m bench.distributed_scan [--images 500] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from producer.enqueue import enqueue_batches
from producer.listing import parse_source
from producer.scan import plan_scan, split_batches
from tests.celery_workers import celery_workers, wait_for_scan
from tests.imagemaker import jpeg
from tests.stack import fill_bucket, start_stack
from worker.settings import Settings
from worker.store import ResultStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with ExitStack() as stack:
        parts = start_stack(stack)
        fill_bucket("bench", [f"p{i % 8}/img{i:06d}.jpg" for i in range(args.images)], jpeg(320, 240))
        env = parts.worker_env(CELEBSCAN_BATCH_SIZE=str(args.batch_size))
        standin, postgres_url = parts.standin, parts.postgres_url
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
        print(
            f"scan: {args.images} images with {args.workers} worker processes in {elapsed:.1f} s "
            f"(worker start-up included) = {args.images / elapsed:.1f} images/s; "
            f"{len(standin.calls)} Rekognition calls"
        )


if __name__ == "__main__":
    main()
