"""Rekognition quota use: how close one small machine runs to the account's quota, unrejected.

4,000 distinct pictures in moto's S3, one Celery worker started as the Procfile says (2 prefork
processes), the Rekognition stand-in with a quota of 50 calls/s (a token bucket holding one
second) answering each call after about a second, PostgreSQL. celebscan keeps
``CELEBSCAN_CALLS_IN_FLIGHT`` calls in flight per process and paces every worker through one token
bucket in Redis (``CELEBSCAN_REKOGNITION_TPS=50``). Baseline: the quota itself. Targets: ≥ 95% of
the quota sustained, < 1% of calls rejected for quota, 0 images lost. Also prints the worker
processes' peak memory. Exits 1 when missed.

    python -m bench.rekognition_quota [--images 4000] [--quota 50] [--latency 1.0] [--calls-in-flight N]
        [--nodes 1] [--processes 2] [--no-pacing]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from producer.scan import ScanRequest, run_scan
from tests.celery_workers import celery_workers, pool_children, wait_for_scan
from tests.imagemaker import jpeg
from tests.stack import fill_bucket, start_stack
from worker.settings import Settings
from worker.store import ResultStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--quota", type=float, default=50.0)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--calls-in-flight", type=int, default=None, help="default: the setting's default")
    parser.add_argument("--nodes", type=int, default=1, help="worker nodes (machines)")
    parser.add_argument("--processes", type=int, default=2, help="prefork processes per node (the Procfile's 2)")
    parser.add_argument("--no-pacing", action="store_true", help="run without the shared token bucket")
    args = parser.parse_args()
    with ExitStack() as stack:
        parts = start_stack(stack, delay=args.latency, quota_tps=args.quota)
        fill_bucket("quota", [f"q/{i:06d}.jpg" for i in range(args.images)], jpeg(200, 150))
        env = parts.worker_env(
            CELEBSCAN_REKOGNITION_TPS="0" if args.no_pacing else str(args.quota),
            CELEBSCAN_MAX_ATTEMPTS="20",
            CELEBSCAN_WORKER_CONCURRENCY=str(args.processes),
        )
        if args.calls_in_flight is not None:
            env["CELEBSCAN_CALLS_IN_FLIGHT"] = str(args.calls_in_flight)
        standin, postgres_url = parts.standin, parts.postgres_url
        settings = Settings.from_env(env)
        store = ResultStore.connect(postgres_url)
        scan_id = run_scan(store, settings, ScanRequest("s3://quota/"), say=lambda line: None).id
        logs = Path(tempfile.mkdtemp(prefix="celebscan-quota-"))
        with celery_workers(args.nodes, env, logs, concurrency=args.processes) as nodes:
            wait_for_scan(store, scan_id, timeout=3600)
            peaks = [peak_rss_mb(pid) for node in nodes for pid in pool_children(node)]
        summary = store.summary(scan_id)

    accepted = sorted(standin.accepted_at)
    rejected = sum(c.answered == "ProvisionedThroughputExceededException" for c in standin.calls)
    rate = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    per_second = Counter(int(moment - accepted[0]) for moment in accepted)
    print("calls per second:", " ".join(str(per_second[second]) for second in range(max(per_second) + 1)))
    share, rejected_share = rate / args.quota, rejected / len(standin.calls)
    lost = args.images - summary.counts["done"]
    met = share >= 0.95 and rejected_share < 0.01 and lost == 0
    in_flight = args.calls_in_flight or Settings().calls_in_flight
    print(
        f"{args.images} images, {args.nodes} worker node(s) x {args.processes} processes, "
        f"{in_flight} calls in flight each, quota {args.quota:.0f} calls/s, "
        f"latency {args.latency * 1000:.0f} ms, pacing {'off' if args.no_pacing else 'on'}"
    )
    print(f"worker processes: {len(peaks)}, peak RSS each: {', '.join(f'{mb:.0f} MB' for mb in peaks)}")
    print(f"sustained {rate:.2f} calls/s = {share:.1%} of the quota (target >= 95%)")
    print(f"rejected for quota: {rejected} of {len(standin.calls)} calls = {rejected_share:.2%} (target < 1%)")
    print(f"images lost: {lost} (done {summary.counts['done']}, failed {summary.counts['failed']})")
    print("OK" if met else "MISSED")
    return 0 if met else 1


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
