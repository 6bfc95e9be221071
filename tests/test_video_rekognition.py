"""Rekognition Video's stand-in, as celebscan's boto3 code calls it."""

from __future__ import annotations

import pytest

from tests.rekognition_video_standin import VideoStandIn, detection
from tests.servers import wait_until
from tests.videomaker import clip, colour
from worker.recognizers.rekognition_video import completion

pytestmark = pytest.mark.slow

SCENES = [(colour((200, 40, 40)), 2.0), (colour((40, 40, 200)), 2.0)]
FAST = {"CELEBSCAN_VIDEO_POLL_SECONDS": "0.2", "CELEBSCAN_VIDEO_POLL_MAX_SECONDS": "1"}


@pytest.fixture
def video_service(rekognition, moto_url, monkeypatch):
    service = VideoStandIn(s3_endpoint=moto_url, job_seconds=0.5)
    service.answer = lambda key, data: [detection(t / 2, "Ada") for t in range(4)] + [detection(3.0, "Grace")]
    rekognition.video = service
    for name in ("SNS", "SQS", "IAM"):
        monkeypatch.setenv(f"AWS_ENDPOINT_URL_{name}", moto_url)
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    yield service
    service.close()


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
