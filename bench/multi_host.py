"""Scaling out: images/s with one worker host, then two, in network namespaces on this machine.

The services (PostgreSQL, Redis, moto's S3, the Rekognition stand-in answering after --latency
seconds, like the real service) run on the services host; each worker host runs one Celery node
with --concurrency processes and reaches the services over its own veth link (see tests/netns.py).
Workers are started and answering pings before the scan is enqueued, so start-up is not timed.
Baseline: the same scan size with one host, in the same run. Needs root (network namespaces).

    python -m bench.multi_host [--images 400] [--concurrency 2] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from producer.metrics import online_workers
from tests.celery_workers import celery_workers, wait_for_scan
from tests.imagemaker import jpeg
from tests.netns import network
from tests.servers import wait_until
from tests.stack import fill_bucket, start_stack
from worker.settings import Settings
from worker.store import ResultStore

TARGET_RATIO = 1.6


def timed_scan(env: dict[str, str], prefix: str, store: ResultStore) -> float:
    """Enqueue the scan of ``prefix`` with the CLI and wait until it finishes; images/s."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "producer.cli", "scan", f"s3://bench/{prefix}/"],
        env={**os.environ, **env},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    scan_id = store.latest_scan_id()
    wait_for_scan(store, scan_id, timeout=1800)
    summary = store.scan_summary(scan_id)
    assert summary.counts["done"] == summary.listed, summary.counts
    return summary.listed / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    with ExitStack() as stack:
        net = stack.enter_context(network(2))
        parts = start_stack(stack, host=net.services_address, trusted_network=net.subnet, delay=args.latency)
        body = jpeg(320, 240)
        for prefix in ("one", "two"):
            fill_bucket("bench", [f"{prefix}/img{i:05d}.jpg" for i in range(args.images)], body)
        env = parts.worker_env(CELEBSCAN_BATCH_SIZE="8")
        settings = Settings.from_env(env)
        store = ResultStore.connect(parts.postgres_url)
        logs = Path(tempfile.mkdtemp(prefix="celebscan-bench-"))
        rates = {}
        for hosts in (1, 2):
            with ExitStack() as workers:
                for host in net.hosts[:hosts]:
                    workers.enter_context(
                        celery_workers(1, env, logs, args.concurrency, host=host, name=f"{host.namespace}-")
                    )
                wait_until(
                    lambda count=hosts: online_workers(settings, 1.0) == count, timeout=120, what="workers online"
                )
                rates[hosts] = timed_scan(env, "one" if hosts == 1 else "two", store)
            print(
                f"{hosts} worker host{'s' if hosts > 1 else ''} x {args.concurrency} processes: "
                f"{rates[hosts]:.1f} images/s"
            )
        ratio = rates[2] / rates[1]
        print(
            f"two hosts / one host: {ratio:.2f}x (expected >= {TARGET_RATIO}x; "
            f"Rekognition latency {args.latency * 1000:.0f} ms; this machine's cores are shared by both hosts)"
        )
        store.engine.dispose()
    sys.exit(0 if ratio >= TARGET_RATIO else 1)


if __name__ == "__main__":
    main()
