"""Producer enqueue rate: image keys per second into Redis, listing excluded.

Baseline, same run: one ``delay()`` per key, the common tutorial way. celebscan: batches of
``--batch-size`` ids per message (the default), pipelined (``producer.enqueue.enqueue_batches``).
Target: ≥ 50× the baseline. Exits 1 when missed.

    python -m bench.enqueue_rate [--keys 50000] [--baseline-keys 3000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import redis

from producer.enqueue import enqueue_batches
from producer.scan import split_batches
from tests.servers import redis_server
from worker.celery_config import QUEUE
from worker.settings import Settings

TARGET = 50.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--baseline-keys", type=int, default=3_000)
    parser.add_argument("--batch-size", type=int, default=Settings().batch_size)
    args = parser.parse_args()

    with redis_server() as url:
        os.environ["CELERY_BROKER_URL"] = url
        from worker.celery_app import process_batch_task  # reads the broker URL from the environment

        client = redis.Redis.from_url(url)
        started = time.perf_counter()
        for key in range(args.baseline_keys):
            process_batch_task.delay([key])
        baseline = args.baseline_keys / (time.perf_counter() - started)
        assert client.llen(QUEUE) == args.baseline_keys
        client.flushall()

        batches = split_batches(list(range(args.keys)), args.batch_size, workers=1, balance=False)
        started = time.perf_counter()
        enqueue_batches(Settings(broker_url=url), batches)
        ours = args.keys / (time.perf_counter() - started)
        assert client.llen(QUEUE) == len(batches)

    ratio = ours / baseline
    print(f"baseline (one delay() per key): {baseline:,.0f} keys/s")
    print(f"celebscan ({args.batch_size} keys per message, pipelined): {ours:,.0f} keys/s")
    print(f"ratio: {ratio:.1f}x (target >= {TARGET:.0f}x) {'OK' if ratio >= TARGET else 'MISSED'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
