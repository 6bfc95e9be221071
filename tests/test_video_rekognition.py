"""Videos scanned with Rekognition Video, against its stand-in: limits checked before any call,
jobs started once (also for copies), paced to the quota, polled or announced through SNS → SQS,
results read page by page into appearances, --max-cost covering their minutes."""

from __future__ import annotations

import json
import time

import pytest

from tests.clirun import celebscan
from tests.rekognition_video_standin import detection
from tests.servers import wait_until
from tests.videomaker import clip, colour, mp4_header
from worker.recognizers.rekognition_video import completion
from worker.store import ResultStore

pytestmark = pytest.mark.slow

SCENES = [(colour((200, 40, 40)), 2.0), (colour((40, 40, 200)), 2.0)]


def test_the_service_as_celebscan_calls_it(video_service, s3, bucket, monkeypatch):
    """The real boto3 calls against the stand-in: a start repeated with its token is the same job, the
    same token with another video is refused, the quota refuses a start with LimitExceededException,
    results come in pages sorted by time, a job that fails says why, and a job's end reaches an SQS
    queue subscribed to the topic its start named."""
    import boto3

    from worker.errors import PermanentError, ThrottledError
    from worker.recognizers.rekognition_video import RekognitionVideo

    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    topic = sns.create_topic(Name="AmazonRekognition-protocol")["TopicArn"]
    queue = sqs.create_queue(QueueName="protocol")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    for key in ("a.mp4", "b.mp4", "c.mp4"):
        s3.put_object(Bucket=bucket, Key=key, Body=clip(SCENES))
    video_service.quota, video_service.job_seconds = 2, 5.0
    video_service.answer = lambda key, data: [detection(t / 10, f"P{t % 3}") for t in range(2500)]
    video_service.fail_job = lambda key: "Unsupported codec" if key == "b.mp4" else None
    service = RekognitionVideo(boto3.client("rekognition"), {"SNSTopicArn": topic, "RoleArn": "arn:aws:iam::1:role/r"})

    first = service.start(bucket, "a.mp4", "token-a")
    assert service.start(bucket, "a.mp4", "token-a") == first and video_service.jobs_started("a.mp4") == 1
    with pytest.raises(PermanentError) as mismatch:
        service.start(bucket, "b.mp4", "token-a")
    assert mismatch.value.code == "IdempotentParameterMismatchException"
    failing = service.start(bucket, "b.mp4", "token-b")
    with pytest.raises(ThrottledError) as full:
        service.start(bucket, "c.mp4", "token-c")
    assert full.value.code == "LimitExceededException"
    assert service.state(first).status == "IN_PROGRESS"
    wait_until(lambda: service.state(first).status == "SUCCEEDED", timeout=10, what="the job's end")
    found = list(service.detections(first))
    assert len(found) == 2500 and [d.timestamp_ms for d in found] == sorted(d.timestamp_ms for d in found)
    assert video_service.gets >= 1 + 3  # 2,500 detections: three pages of 1,000
    wait_until(lambda: service.state(failing).status != "IN_PROGRESS", timeout=10, what="the failing job's end")
    failed = service.state(failing)
    assert (failed.status, failed.message) == ("FAILED", "Unsupported codec")
    with pytest.raises(PermanentError) as unknown:
        service.state("no-such-job")
    assert unknown.value.code == "VideoJobNotFound"
    bodies = []
    wait_until(
        lambda: (
            bodies.extend(sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []))
            or len(bodies) >= 2
        ),
        timeout=10,
        what="two completion messages",
    )
    ended = {completion(message["Body"]) for message in bodies}
    assert ended == {(first, "SUCCEEDED"), (failing, "FAILED")}


def scan(database: str, source: str, *options: str) -> str:
    return celebscan("--database-url", database, "scan", source, "--backend", "rekognition", *options).output


def records(database: str) -> dict[str, dict]:
    lines = celebscan("--database-url", database, "results").output.splitlines()
    return {record["key"]: record for record in map(json.loads, lines)}


def test_a_mixed_bucket(video_service, s3, bucket, database_url, rekognition):
    story = clip(SCENES, size=(320, 240))
    objects = {
        "v/story.mp4": story,
        "v/backup/story.mp4": story,  # a copy: follows the first one's job
        "v/hevc.mp4": clip(SCENES, kind="mp4-hevc"),
        "v/seven hours.mp4": mp4_header(7 * 3600),
        "v/broken.mp4": story[:300],
        "v/clip.mkv": clip(SCENES, kind="mkv"),
        "v/refused.mov": clip(SCENES, kind="mov"),
        "v/photo.jpg": (__import__("tests.imagemaker", fromlist=["jpeg"]).jpeg(200, 160)),
    }
    for key, data in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    video_service.fail_job = lambda key: "Unable to analyse the video" if key == "v/refused.mov" else None

    output = scan(database_url, f"s3://{bucket}/v/", "--workers", "2")
    assert "of which videos: 0 queued, 2 done, 5 failed" in output, output
    found = records(database_url)
    ada = {a["name"]: a for a in found["v/story.mp4"]["appearances"]}
    assert ada["Ada"]["ranges"] == [{"start": 0.0, "end": 1.5}] and ada["Ada"]["detections"] == 4
    assert ada["Grace"]["ranges"] == [{"start": 3.0, "end": 3.0}] and ada["Grace"]["id"] == "id-Grace"
    assert found["v/backup/story.mp4"]["appearances"] == found["v/story.mp4"]["appearances"]
    assert found["v/story.mp4"]["duration_seconds"] == 4.0
    codes = {key: record["error"]["code"] for key, record in found.items() if record["error"]}
    assert codes == {
        "v/hevc.mp4": "UnsupportedVideoCodec",
        "v/seven hours.mp4": "VideoTooLong",
        "v/broken.mp4": "CorruptVideo",
        "v/clip.mkv": "UnsupportedVideoFormat",
        "v/refused.mov": "VideoJobFailed",
    }
    started = sorted(start.key for start in video_service.starts if start.new)
    assert started == ["v/backup/story.mp4", "v/refused.mov"] or started == ["v/refused.mov", "v/story.mp4"]
    assert [call.key for call in rekognition.calls] == ["v/photo.jpg"]
    assert "0 jobs running for this scan" in output and "0.13 minutes of video paid" in output, output
    people = celebscan("--database-url", database_url, "people").output
    assert "2 videos  Ada" in people, people

    again = scan(database_url, f"s3://{bucket}/v/")  # failures are tried again; a failed job is not
    assert "3 already done" in again and len([start for start in video_service.starts if start.new]) == 2, again


def test_jobs_are_paced_to_the_quota(video_service, s3, bucket, sqlite_url, monkeypatch):
    """Eight videos, a quota of 2 (the account's and celebscan's): never more than 2 jobs at once,
    none refused, none started twice; then the account's quota drops to 1 under celebscan's 2: the
    refused starts wait for a place and every video still ends done, each started once."""
    for number in range(8):
        s3.put_object(Bucket=bucket, Key=f"q/{number}.mp4", Body=clip([(colour((number * 30, 0, 0)), 1.0)]))
    video_service.quota, video_service.job_seconds = 2, 0.6
    monkeypatch.setenv("CELEBSCAN_REKOGNITION_VIDEO_JOBS", "2")
    scan(sqlite_url, f"s3://{bucket}/q/", "--workers", "3")
    intervals = video_service.intervals()
    most = max(sum(1 for s, e in intervals if s <= moment < e) for moment, _ in intervals)
    assert most == 2 and len(intervals) == 8
    assert {start.answered for start in video_service.starts} == {"ok"}

    for number in range(8, 12):
        s3.put_object(Bucket=bucket, Key=f"q/{number}.mp4", Body=clip([(colour((0, number * 20, 0)), 1.0)]))
    video_service.quota, video_service.job_seconds = 1, 3.0  # long enough that the workers' jobs overlap
    output = scan(sqlite_url, f"s3://{bucket}/q/", "--workers", "3")
    assert "of which videos: 0 queued, 4 done, 0 failed" in output, output
    assert "LimitExceededException" in {start.answered for start in video_service.starts}
    assert all(video_service.jobs_started(f"q/{number}.mp4") == 1 for number in range(12))


def test_completions_through_sns_and_sqs(video_service, s3, bucket, sqlite_url, monkeypatch):
    """With `video-jobs --setup`'s topic, queue and role, a job's end reaches the workers through
    SNS and SQS: the videos end long before their first poll would come (a minute). A lost message
    costs only that poll; a message delivered twice changes nothing."""
    setup = celebscan("--database-url", sqlite_url, "video-jobs", "--setup", "--name", "jobs-test").output
    for line in setup.splitlines():
        name, _, value = line.strip().partition("=")
        if name.startswith("CELEBSCAN_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("CELEBSCAN_VIDEO_POLL_MAX_SECONDS", "60")
    for number in range(3):
        s3.put_object(Bucket=bucket, Key=f"n/{number}.mp4", Body=clip([(colour((0, 0, number * 60)), 1.0)]))
    started = time.monotonic()
    output = scan(sqlite_url, f"s3://{bucket}/n/", "--workers", "2")
    assert "of which videos: 0 queued, 3 done" in output, output
    assert time.monotonic() - started < 30 and video_service.gets <= 3 * 3, "ended by their messages, not polls"
    assert all(job.published for job in video_service.jobs.values())

    monkeypatch.setenv("CELEBSCAN_VIDEO_POLL_MAX_SECONDS", "3")
    video_service.lose_completion = lambda key: key == "n/lost.mp4"
    s3.put_object(Bucket=bucket, Key="n/lost.mp4", Body=clip([(colour((9, 9, 9)), 1.0)]))
    output = scan(sqlite_url, f"s3://{bucket}/n/", "--workers", "1")
    assert "of which videos: 0 queued, 1 done" in output and video_service.jobs_started("n/lost.mp4") == 1, output
    again = celebscan("--database-url", sqlite_url, "video-jobs", "--setup", "--name", "jobs-test").output
    settings = [line for line in setup.splitlines() if "CELEBSCAN_" in line]
    assert len(settings) == 3 and settings == [line for line in again.splitlines() if "CELEBSCAN_" in line]


def test_max_cost_covers_video_minutes(video_service, s3, bucket, sqlite_url):
    """Three 30-second videos ($0.05 each at $0.10/min) and a budget of $0.12: two are started,
    the third waits for --resume; the budget is never overspent."""
    for number in range(3):
        s3.put_object(Bucket=bucket, Key=f"b/{number}.mp4", Body=mp4_header(30, media_bytes=10 + number))
    video_service.fail_job = lambda key: None
    estimate = celebscan("--database-url", sqlite_url, "estimate", f"s3://{bucket}/b/").output
    assert "3 to send: 1.5 minutes" in estimate and "$0.1500 for 1.5 minutes" in estimate, estimate
    output = scan(sqlite_url, f"s3://{bucket}/b/", "--max-cost", "0.12", "--workers", "1")
    assert len([start for start in video_service.starts if start.new]) == 2, output
    summary = ResultStore.connect(sqlite_url).summary(1)
    assert summary.videos["queued"] == 1 and summary.retrying == {"OverBudget": 1}, summary
    assert "left out by --max-cost: 1 video" in celebscan("--database-url", sqlite_url, "status").output
    resumed = celebscan("--database-url", sqlite_url, "scan", "--resume", "1", "--max-cost", "0.05").output
    assert "of which videos: 0 queued, 3 done" in resumed and len(video_service.starts) == 3, resumed
