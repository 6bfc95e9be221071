"""Pay once per picture: Rekognition calls and cost on a bucket where a quarter of the objects are copies.

A bucket in moto's S3 server holds ``--pictures`` distinct pictures plus a third as many copies of
them under other keys (so 25% of the objects are copies), in folders as a photo archive has them
(``2024/``, then ``backup/`` holding copies). An embedded `celebscan scan --backend rekognition
--workers 2` scans it against the Rekognition stand-in (50 ms per call, like the service); then the
same scan with ``--force`` into a fresh database, which recognizes every object (the baseline, what
celebscan did before). Printed: calls, cost at the list price, wall time, and the ratio.
Target: calls = distinct pictures (copies in flight at the same moment in two processes may both be
called; the figure says how many were).

    python -m bench.dedupe [--pictures 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import boto3
from click.testing import CliRunner

from producer.cli import cli
from tests.conftest import AWS_TEST_ENV
from tests.imagemaker import jpeg
from tests.rekognition_standin import RekognitionStandIn, celebrity
from tests.servers import free_port
from worker.settings import DEFAULT_REKOGNITION_PRICES

PRICE = float(DEFAULT_REKOGNITION_PRICES.split(":")[0])


def fill(s3, bucket: str, pictures: int) -> int:
    """``pictures`` distinct JPEGs in 2024/, a copy of every third one in backup/; returns the object count."""
    s3.create_bucket(Bucket=bucket)
    objects = 0
    for number in range(pictures):
        data = jpeg(160 + number % 200, 120 + number // 200)
        s3.put_object(Bucket=bucket, Key=f"2024/{number:05d}.jpg", Body=data)
        objects += 1
        if number % 3 == 0:
            s3.put_object(Bucket=bucket, Key=f"backup/2024/{number:05d}.jpg", Body=data)
            objects += 1
    return objects


def run_scan(env: dict, database: str, source: str, *extra: str) -> float:
    started = time.perf_counter()
    result = CliRunner().invoke(
        cli,
        ["--database-url", database, "scan", source, "--backend", "rekognition", "--workers", "2", *extra],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=300)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    s3_url = f"http://127.0.0.1:{port}"
    env = {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": s3_url}
    os.environ.update(env)
    workdir = Path(tempfile.mkdtemp(prefix="celebscan-dedupe-"))
    try:
        objects = fill(boto3.client("s3"), "photos", args.pictures)
        with RekognitionStandIn(s3_endpoint=s3_url) as standin:
            standin.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
            standin.delay = 0.05
            env = {**env, "AWS_ENDPOINT_URL_REKOGNITION": standin.url}
            reuse_s = run_scan(env, f"sqlite:///{workdir / 'reuse.db'}", "s3://photos/")
            reuse_calls = len(standin.calls)
            baseline_s = run_scan(env, f"sqlite:///{workdir / 'force.db'}", "s3://photos/", "--force")
            baseline_calls = len(standin.calls) - reuse_calls
    finally:
        moto.stop()
    copies = objects - args.pictures
    print(f"\n{objects} objects: {args.pictures} distinct pictures, {copies} copies ({copies / objects:.0%})")
    print(f"{'':<36}{'calls':>8}{'cost':>10}{'wall (s)':>10}")
    print(
        f"{'baseline: every object (--force)':<36}{baseline_calls:>8}{baseline_calls * PRICE:>10.3f}{baseline_s:>10.1f}"
    )
    print(f"{'celebscan: once per picture':<36}{reuse_calls:>8}{reuse_calls * PRICE:>10.3f}{reuse_s:>10.1f}")
    print(
        f"calls saved: {baseline_calls - reuse_calls} ({(baseline_calls - reuse_calls) / baseline_calls:.1%}); "
        f"{reuse_calls - args.pictures} copies called because their original was in flight at the same moment"
    )
    met = reuse_calls <= args.pictures * 1.02 and baseline_calls == objects
    print(f"target: calls = distinct pictures (within 2%): {'OK' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
