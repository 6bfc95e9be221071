"""Rekognition Video jobs kept running: how close the fleet keeps the account's quota of
concurrent jobs busy, and that no video is started twice.

200 distinct videos of 30 s in moto's S3, Rekognition Video's stand-in taking ~20 s a job (±10%)
within a quota of 20 jobs in progress, one Celery worker started as the Procfile says (2 prefork
processes), PostgreSQL and Redis; celebscan paces its jobs to ``CELEBSCAN_REKOGNITION_VIDEO_JOBS=20``.
Each mode scans a bucket of its own: ``poll`` (the default: each job looked at after 5 s, then
after a quarter of its age; ``pollN``: from N seconds) and ``sns`` (``celebscan video-jobs
--setup``: each job's end reaches the workers through SNS and SQS).

Figures, from the first start to the last (after it, fewer than 20 are left): the jobs running on
average over the quota (the share of the quota's job-time used: the target), and the share of time
all 20 were running (with 20 jobs of ~20 s, one ends every second: a place stays free from a job's
end until the next start, so this share falls with that gap, also printed); jobs started twice;
the makespan against the baseline, the ideal (videos / quota × the mean job time, run in the same
process). Target: ≥ 95% of the quota's job-time used and 0 started twice, in some mode. Exits 1
when missed.

    python -m bench.video_jobs [--videos 200] [--job-seconds 20] [--quota 20] [--modes poll,sns]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import boto3

from producer.scan import ScanRequest, run_scan
from producer.video_notifications import set_up
from tests.celery_workers import celery_workers, wait_for_scan
from tests.rekognition_video_standin import VideoStandIn, detection
from tests.stack import start_stack
from tests.videomaker import mp4_header
from worker.settings import Settings
from worker.store import ResultStore

TARGET = 0.95


@dataclass(frozen=True)
class Run:
    mode: str
    full_share: float  # of the time from the first start to the last, the share with the quota's jobs running
    mean_running: float
    started_twice: int
    makespan: float
    ideal: float
    done: int


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0, help="each video's length")
    parser.add_argument("--job-seconds", type=float, default=20.0)
    parser.add_argument("--quota", type=int, default=20)
    parser.add_argument("--modes", default="poll,sns")
    args = parser.parse_args()
    runs = []
    with ExitStack() as stack:
        parts = start_stack(stack)
        service = VideoStandIn(s3_endpoint=parts.moto_url, job_seconds=args.job_seconds, quota=args.quota)
        service.job_jitter = 0.1
        service.answer = lambda key, data: [detection(t, "Ada") for t in range(int(args.seconds))]
        stack.callback(service.close)
        parts.standin.video = service
        store = ResultStore.connect(parts.postgres_url)
        for index, mode in enumerate(args.modes.split(",")):
            runs.append(_run(mode, index, args, parts, service, store))
    for run in runs:
        print(
            f"{run.mode}: {run.mean_running:.1%} of the quota's job-time used (target >= {TARGET:.0%}), all "
            f"{args.quota} running {run.full_share:.1%} of the time; started twice: {run.started_twice}; "
            f"makespan {run.makespan:.0f} s against the ideal {run.ideal:.0f} s ({run.makespan / run.ideal:.2f}x); "
            f"{run.done} of {args.videos} done"
        )
    met = any(run.mean_running >= TARGET for run in runs) and all(r.started_twice == 0 for r in runs)
    met = met and all(run.done == args.videos for run in runs)
    print("OK" if met else "MISSED")
    return 0 if met else 1


def _run(mode: str, index: int, args, parts, service: VideoStandIn, store: ResultStore) -> Run:
    for service_name in ("SNS", "SQS", "IAM"):  # this process sets the notifications up (start_stack restores it)
        os.environ[f"AWS_ENDPOINT_URL_{service_name}"] = parts.moto_url
    bucket = f"videos-{mode.replace('.', '-')}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    other = index * args.videos  # other bytes in each mode's bucket: the same would follow the first mode's jobs
    for number in range(args.videos):
        body = mp4_header(args.seconds, media_bytes=other + number)
        s3.put_object(Bucket=bucket, Key=f"v/{number:04d}.mp4", Body=body)
    env = parts.worker_env(
        CELEBSCAN_REKOGNITION_VIDEO_JOBS=str(args.quota),
        AWS_ENDPOINT_URL_SNS=parts.moto_url,
        AWS_ENDPOINT_URL_SQS=parts.moto_url,
        AWS_ENDPOINT_URL_IAM=parts.moto_url,
    )
    if mode.startswith("poll") and mode != "poll":  # pollN: jobs looked at from N seconds on
        env["CELEBSCAN_VIDEO_POLL_SECONDS"] = mode[len("poll") :]
    if mode == "sns":
        made = set_up(Settings.from_env(env), "bench-video-jobs")
        env.update(
            CELEBSCAN_VIDEO_SNS_TOPIC_ARN=made.topic_arn,
            CELEBSCAN_VIDEO_SNS_ROLE_ARN=made.role_arn,
            CELEBSCAN_VIDEO_COMPLETIONS_QUEUE_URL=made.queue_url,
        )
    before = len(service.intervals())
    settings = Settings.from_env(env)
    started = time.monotonic()
    scan_id = run_scan(store, settings, ScanRequest(f"s3://{bucket}/"), say=lambda line: None).id
    logs = Path(tempfile.mkdtemp(prefix=f"celebscan-video-jobs-{mode}-"))
    with celery_workers(1, env, logs, concurrency=2):
        wait_for_scan(store, scan_id, timeout=3600)
    makespan = time.monotonic() - started
    intervals = sorted(service.intervals())[before:]
    keys = [f"v/{number:04d}.mp4" for number in range(args.videos)]
    twice = sum(1 for key in keys if service.jobs_started(key, bucket) > 1)
    full, mean = _busy(intervals, args.quota)
    starts = sorted(start for start, _ in intervals)
    refills = sorted(next(start for start in starts if start >= end) - end for _, end in intervals if end <= starts[-1])
    if refills:
        print(
            f"{mode}: a place a job left is taken again after {refills[len(refills) // 2]:.2f} s (median), "
            f"{refills[int(len(refills) * 0.9)]:.2f} s (p90)"
        )
    mean_job = sum(end - start for start, end in intervals) / len(intervals)
    ideal = args.videos / args.quota * mean_job
    return Run(mode, full, mean, twice, makespan, ideal, store.summary(scan_id).videos.get("done", 0))


def _busy(intervals: list[tuple[float, float]], quota: int) -> tuple[float, float]:
    """From the first start to the last: the share of time with ``quota`` jobs running, and the mean running."""
    first, last = intervals[0][0], max(start for start, _ in intervals)
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running, at, full, area = 0, first, 0.0, 0.0
    for moment, change in events:
        moment = min(max(moment, first), last)
        full += (moment - at) * (running >= quota)
        area += (moment - at) * running
        at, running = moment, running + change
    span = last - first
    return full / span, area / span / quota


if __name__ == "__main__":
    sys.exit(main())
