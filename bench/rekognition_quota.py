"""Rekognition quota use: how close 4 workers run to the account's quota without being rejected.

1,200 images in moto's S3, 4 Celery worker processes (2 nodes × 2), the Rekognition stand-in with a
quota of 20 calls/s (a token bucket holding one second) and 100 ms latency, PostgreSQL. celebscan
paces every worker through one token bucket in Redis (``CELEBSCAN_REKOGNITION_TPS=20``).
Baseline: the quota itself. Targets: ≥ 95% of the quota sustained, < 1% of calls rejected for
quota, 0 images lost. Exits 1 when missed.

    python -m bench.rekognition_quota [--images 1200] [--quota 20] [--latency 0.1] [--no-pacing]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from producer.scan import ScanRequest, run_scan
from tests.celery_workers import celery_workers, wait_for_scan
from tests.imagemaker import jpeg
from tests.stack import fill_bucket, start_stack
from worker.settings import Settings
from worker.store import ResultStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--quota", type=float, default=20.0)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--no-pacing", action="store_true", help="run without the shared token bucket")
    args = parser.parse_args()
    with ExitStack() as stack:
        parts = start_stack(stack, delay=args.latency, quota_tps=args.quota)
        fill_bucket("quota", [f"q/{i:06d}.jpg" for i in range(args.images)], jpeg(200, 150))
        env = parts.worker_env(
            CELEBSCAN_REKOGNITION_TPS="0" if args.no_pacing else str(args.quota), CELEBSCAN_MAX_ATTEMPTS="20"
        )
        standin, postgres_url = parts.standin, parts.postgres_url
        settings = Settings.from_env(env)
        store = ResultStore.connect(postgres_url)
        scan_id = run_scan(store, settings, ScanRequest("s3://quota/"), say=lambda line: None).id
        with celery_workers(2, env, Path(tempfile.mkdtemp(prefix="celebscan-quota-")), concurrency=2):
            wait_for_scan(store, scan_id, timeout=3600)
        summary = store.summary(scan_id)

    accepted = sorted(standin.accepted_at)
    rejected = sum(c.answered == "ProvisionedThroughputExceededException" for c in standin.calls)
    rate = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    share, rejected_share = rate / args.quota, rejected / len(standin.calls)
    lost = args.images - summary.counts["done"]
    met = share >= 0.95 and rejected_share < 0.01 and lost == 0
    print(
        f"{args.images} images, 4 worker processes, quota {args.quota:.0f} calls/s, "
        f"latency {args.latency * 1000:.0f} ms, "
        f"pacing {'off' if args.no_pacing else 'on'}"
    )
    print(f"sustained {rate:.2f} calls/s = {share:.1%} of the quota (target >= 95%)")
    print(f"rejected for quota: {rejected} of {len(standin.calls)} calls = {rejected_share:.2%} (target < 1%)")
    print(f"images lost: {lost} (done {summary.counts['done']}, failed {summary.counts['failed']})")
    print("OK" if met else "MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
