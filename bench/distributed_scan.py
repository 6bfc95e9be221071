"""Distributed scan throughput: N images from moto's S3, through Redis, to 2 Celery worker processes,
against the Rekognition stand-in with no latency, into PostgreSQL.

Prints the listing and recording time and the end-to-end images/s.

    python -m bench.distributed_scan [--images 500] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from producer.scan import ScanRequest, run_scan
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
        scan_id = run_scan(store, settings, ScanRequest("s3://bench/"), say=lambda line: None).id
        print(f"listing + recording {args.images} images: {time.perf_counter() - started:.2f} s")

        logs = Path(tempfile.mkdtemp(prefix="celebscan-bench-"))
        with celery_workers(args.workers, env, logs):
            first = time.perf_counter()
            wait_for_scan(store, scan_id, timeout=1800)
            elapsed = time.perf_counter() - first
        summary = store.summary(scan_id)
        assert summary.counts["done"] == args.images, summary.counts
        print(
            f"scan: {args.images} images with {args.workers} worker processes in {elapsed:.1f} s "
            f"(worker start-up included) = {args.images / elapsed:.1f} images/s; "
            f"{len(standin.calls)} Rekognition calls"
        )


if __name__ == "__main__":
    main()
