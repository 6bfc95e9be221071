"""A whole bucket at scale: `celebscan scan` of a synthetic bucket of 100k and 1M objects.

Real PostgreSQL and Redis, 2 Celery worker processes (rekognition backend against the stand-in,
which reads the objects from the same synthetic S3), the synthetic S3 stand-in in its own process
(``tests/synthetic_s3.py``). ``scan`` splits the key space and returns; the two worker processes
list its parts while they recognize. For each size and layout (100 prefixes, and flat: no ``/`` in
keys) it prints: seconds until ``scan`` returns and to the first recognizer call, images listed and
recorded per second (from ``scan`` starting to the listing's end, as the database records it), the
producer's peak RSS, Redis's peak memory, PostgreSQL bytes per queued image, and the ratio of the
listing rate to the named baseline measured in the same run: one boto3 ListObjectsV2 paginator
listing the same bucket without recording anything (what ``aws s3api list-objects-v2`` does).

With ``--latency 1.0`` the stand-in answers each call after a second, as Rekognition does: the
workers' calls then wait on the network while the same processes list (a thread of each run lists
while its calls are in flight).

    python -m bench.bucket_scale [--sizes 100000 1000000] [--layouts prefixed flat] [--latency SECONDS]
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

import boto3
import redis
from sqlalchemy import create_engine, text

from tests.celery_workers import celery_workers
from tests.conftest import AWS_TEST_ENV
from tests.rekognition_standin import RekognitionStandIn, celebrity
from tests.servers import PostgresServer, RedisServer, running
from tests.synthetic_s3 import serving_in_a_process

TARGETS = {"first_call_s": 20.0, "images_per_s": 10_000.0, "redis_peak_mb": 64.0, "producer_rss_mb": 200.0}
PRODUCER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(code)
"""


def baseline_listing_rate(url: str, bucket: str) -> float:
    """Keys/s of one plain boto3 paginator over the whole bucket (no recording)."""
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    started, keys = time.perf_counter(), 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += len(page.get("Contents", ()))
    return keys / (time.perf_counter() - started)


def wait_for_listing(engine, size: int, timeout: float = 3600.0) -> float:
    """The monotonic time at which the workers had listed the whole bucket (polled each 0.2 s)."""
    deadline = time.monotonic() + timeout
    query = text(
        "SELECT s.listing_finished_at IS NOT NULL, s.listed + coalesce(sum(p.listed), 0) "
        "FROM scans s LEFT JOIN listing_parts p ON p.scan_id = s.id GROUP BY s.id ORDER BY s.id DESC LIMIT 1"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            ended, listed = conn.execute(query).one()
        if ended:
            assert listed == size, f"listed {listed} of {size}"
            return time.monotonic()
        time.sleep(0.2)
    raise TimeoutError("the workers did not finish listing")


def measure(size: int, layout: str, workdir: Path, latency: float = 0.0) -> dict[str, float]:
    with ExitStack() as stack:
        postgres = stack.enter_context(running(PostgresServer()))
        broker = stack.enter_context(running(RedisServer()))
        s3_url = stack.enter_context(serving_in_a_process("big", size, 100 if layout == "prefixed" else 0))
        standin = stack.enter_context(RekognitionStandIn(s3_endpoint=s3_url))
        standin.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
        standin.delay = latency
        env = {
            **AWS_TEST_ENV,
            "AWS_ENDPOINT_URL_S3": s3_url,
            "AWS_ENDPOINT_URL_REKOGNITION": standin.url,
            "CELERY_BROKER_URL": broker.url,
            "CELEBSCAN_DATABASE_URL": postgres.url,
        }
        baseline = baseline_listing_rate(s3_url, "big")
        with celery_workers(1, env, workdir, concurrency=2):
            started = time.monotonic()
            producer = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    PRODUCER,
                    sys.executable,
                    "-m",
                    "producer.cli",
                    "scan",
                    "s3://big/",
                    "--backend",
                    "rekognition",
                ],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
            )
            returned = time.monotonic() - started
            assert producer.returncode == 0, producer.stderr[-3000:]
            assert "on the workers" in producer.stdout, producer.stdout
            engine = create_engine(postgres.url)
            listed = wait_for_listing(engine, size)
            elapsed = listed - started
            deadline = time.monotonic() + 60  # the first call may come after the listing (a small bucket)
            while not standin.arrivals and time.monotonic() < deadline:
                time.sleep(0.05)
            first_call = (min(t for t, _ in standin.arrivals) - started) if standin.arrivals else float("inf")
            peak_rss_kb = int(producer.stdout.split("PEAK_RSS_KB")[1].split()[0])
            redis_peak = redis.Redis.from_url(broker.url).info("memory")["used_memory_peak"]
        with engine.connect() as conn:
            images_bytes = conn.execute(text("SELECT pg_total_relation_size('images')")).scalar_one()
            faces_bytes, face_rows = conn.execute(
                text("SELECT pg_total_relation_size('faces'), (SELECT count(*) FROM faces)")
            ).one()
        engine.dispose()
    return {
        "scan_returned_s": returned,
        "first_call_s": first_call,
        "images_per_s": size / elapsed,
        "producer_rss_mb": peak_rss_kb / 1024,
        "redis_peak_mb": redis_peak / 1e6,
        "pg_bytes_per_image": images_bytes / size,
        "pg_bytes_per_face": faces_bytes / max(face_rows, 1),
        "baseline_keys_per_s": baseline,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--layouts", nargs="+", default=["prefixed", "flat"], choices=["prefixed", "flat"])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds the stand-in takes to answer a call")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="celebscan-scale-"))
    print(f"recognizer stand-in answering after {args.latency:g} s")
    results = {
        (size, layout): measure(size, layout, workdir, args.latency) for layout in args.layouts for size in args.sizes
    }
    print(f"\n{'figure':<34}" + "".join(f"{f'{s:,} {layout}':>20}" for s, layout in results))
    rows = [
        ("`scan` returned (s)", "scan_returned_s", "{:.1f}"),
        ("first recognizer call (s)", "first_call_s", "{:.1f}"),
        ("listed + recorded (images/s)", "images_per_s", "{:,.0f}"),
        ("baseline: boto3 paginator (keys/s)", "baseline_keys_per_s", "{:,.0f}"),
        ("producer peak RSS (MB)", "producer_rss_mb", "{:.0f}"),
        ("Redis peak memory (MB)", "redis_peak_mb", "{:.1f}"),
        ("PostgreSQL bytes per image", "pg_bytes_per_image", "{:.0f}"),
        ("PostgreSQL bytes per face row", "pg_bytes_per_face", "{:.0f}"),
    ]
    for label, name, fmt in rows:
        print(f"{label:<34}" + "".join(f"{fmt.format(r[name]):>20}" for r in results.values()))
    print(
        f"{'ratio to the baseline':<34}"
        + "".join(f"{r['images_per_s'] / r['baseline_keys_per_s']:>19.2f}x" for r in results.values())
    )
    largest = max(args.sizes)
    met = all(
        r["first_call_s"] <= TARGETS["first_call_s"]
        and r["images_per_s"] >= TARGETS["images_per_s"]
        and (
            size < largest
            or (r["redis_peak_mb"] <= TARGETS["redis_peak_mb"] and r["producer_rss_mb"] <= TARGETS["producer_rss_mb"])
        )
        for (size, _), r in results.items()
    )
    print(
        f"targets: first call <= 20 s, >= 10,000 images/s, at the largest size Redis <= 64 MB and producer "
        f"<= 200 MB: {'OK' if met else 'MISSED'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
