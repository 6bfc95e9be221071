"""Setting up the queue a bucket sends its events to (moto's S3 and SQS, which deliver them): the
queue, its dead-letter queue and a policy for that bucket only; the configurations already on the
bucket kept; an overlapping one refused before anything changes; a second run changes nothing."""

from __future__ import annotations

import json

import boto3
import pytest

from producer.event_queue import MAX_RECEIVES, NotificationOverlapError, set_up_event_queue
from producer.s3_events import CREATED, parse_message

ACCOUNT = "123456789012"


@pytest.fixture
def sqs(aws_env, moto_url):
    return boto3.client("sqs", endpoint_url=moto_url)


def other_queue(sqs, name: str) -> str:
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def configure(s3, bucket, *configurations: dict) -> None:
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"QueueConfigurations": list(configurations)}
    )


def queue_configuration(name: str, arn: str, events: list[str], prefix: str | None = None) -> dict:
    configuration = {"Id": name, "QueueArn": arn, "Events": events}
    if prefix is not None:  # none: the whole bucket
        configuration["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    return configuration


def configurations(s3, bucket) -> list[dict]:
    return s3.get_bucket_notification_configuration(Bucket=bucket).get("QueueConfigurations", [])


def test_the_queue_is_set_up_and_receives_the_prefix_s_events(s3, sqs, bucket):
    elsewhere = other_queue(sqs, f"{bucket}-thumbnails")
    configure(s3, bucket, queue_configuration("thumbnails", elsewhere, ["s3:ObjectCreated:*"], "thumbnails/"))

    queue = set_up_event_queue(s3, sqs, ACCOUNT, bucket, "photos/", f"{bucket}-events")

    kept = {each["Id"]: each for each in configurations(s3, bucket)}
    assert set(kept) == {"thumbnails", queue.configuration_id}, "the bucket's other configuration is kept"
    ours = kept[queue.configuration_id]
    assert ours["QueueArn"] == queue.arn and sorted(ours["Events"]) == ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue.url, AttributeNames=["All"])["Attributes"]
    assert json.loads(attributes["RedrivePolicy"]) == {
        "deadLetterTargetArn": queue.dead_letter_arn,
        "maxReceiveCount": MAX_RECEIVES,
    }
    (statement,) = json.loads(attributes["Policy"])["Statement"]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"} and statement["Resource"] == queue.arn
    assert statement["Condition"] == {
        "ArnEquals": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"},
        "StringEquals": {"aws:SourceAccount": ACCOUNT},
    }

    s3.put_object(Bucket=bucket, Key="photos/a b.jpg", Body=b"picture")
    s3.put_object(Bucket=bucket, Key="thumbnails/a b.jpg", Body=b"small")  # the other configuration's
    events = []
    while not events:  # after the test event S3 sends when the configuration is set
        received = sqs.receive_message(QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=5)
        assert received.get("Messages"), "no event came"
        for message in received["Messages"]:
            events += parse_message(message["Body"])
            sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=message["ReceiptHandle"])
    assert [(event.kind, event.key) for event in events] == [(CREATED, "photos/a b.jpg")]

    again = set_up_event_queue(s3, sqs, ACCOUNT, bucket, "photos/", f"{bucket}-events")
    assert again == queue and len(configurations(s3, bucket)) == 2, "a second run changes nothing"
    quiet = sqs.receive_message(QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    assert not quiet.get("Messages"), "the configuration was not written again (no second s3:TestEvent)"


@pytest.mark.parametrize(
    ("their_prefix", "their_events"),
    [(None, ["s3:ObjectCreated:Put"]), ("photos/2024/", ["s3:ObjectRemoved:*"]), ("photos/", ["s3:ObjectCreated:*"])],
    ids=["whole-bucket", "narrower", "same"],
)
def test_an_overlapping_configuration_is_refused_before_anything_changes(s3, sqs, bucket, their_prefix, their_events):
    elsewhere = other_queue(sqs, f"{bucket}-other")
    configure(s3, bucket, queue_configuration("someone-else", elsewhere, their_events, their_prefix))

    with pytest.raises(NotificationOverlapError, match="someone-else"):
        set_up_event_queue(s3, sqs, ACCOUNT, bucket, "photos/", f"{bucket}-events")

    assert [each["Id"] for each in configurations(s3, bucket)] == ["someone-else"]
    assert not sqs.list_queues(QueueNamePrefix=f"{bucket}-events").get("QueueUrls"), "no queue made"


def test_events_of_other_kinds_or_prefixes_are_no_overlap(s3, sqs, bucket):
    elsewhere = other_queue(sqs, f"{bucket}-other")
    configure(
        s3,
        bucket,
        queue_configuration("restores", elsewhere, ["s3:ObjectRestore:*"]),
        queue_configuration("exports", elsewhere, ["s3:ObjectCreated:*"], "exports/"),
    )
    queue = set_up_event_queue(s3, sqs, ACCOUNT, bucket, "photos/", f"{bucket}-events")
    assert {each["Id"] for each in configurations(s3, bucket)} == {"restores", "exports", queue.configuration_id}
