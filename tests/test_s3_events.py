"""S3 Event Notifications read from SQS messages: S3's own (from moto's server, which sends them to
SQS as S3 does), wrapped by SNS, and as EventBridge sends them; keys decoded; test events ignored;
anything else a clear error; the later of two events of one key by its sequencer."""

from __future__ import annotations

import json

import boto3
import pytest

from producer.s3_events import CREATED, REMOVED, MalformedEventError, ObjectEvent, later, parse_message

KEYS = ["plain.jpg", "with space.jpg", "a+b.jpg", "100%.jpg", "été/北京 ☃.jpg"]


@pytest.fixture
def notified_queue(aws_env, moto_url, s3, bucket):
    """An SQS queue that ``bucket`` sends its ObjectCreated and ObjectRemoved notifications to."""
    sqs = boto3.client("sqs", endpoint_url=moto_url)
    queue_url = sqs.create_queue(QueueName=f"{bucket}-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]
        },
    )
    return sqs, queue_url


def received_events(sqs, queue_url) -> list[ObjectEvent]:
    events = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return events
        for message in messages:
            events += parse_message(message["Body"])
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def test_s3_notifications_through_sqs_give_the_objects_real_names(notified_queue, s3, bucket):
    sqs, queue_url = notified_queue
    received_events(sqs, queue_url)  # the test event S3 sends when the configuration is set
    etags = {key: s3.put_object(Bucket=bucket, Key=key, Body=b"picture " + key.encode())["ETag"] for key in KEYS}
    s3.delete_object(Bucket=bucket, Key="a+b.jpg")

    events = received_events(sqs, queue_url)

    created = [event for event in events if event.kind == CREATED]
    assert sorted(event.key for event in created) == sorted(KEYS)
    assert all(event.bucket == bucket for event in events)
    assert {event.key: event.etag for event in created} == {key: etag.strip('"') for key, etag in etags.items()}
    assert {event.key: event.size for event in created} == {key: len(b"picture " + key.encode()) for key in KEYS}
    assert [(event.kind, event.key) for event in events if event.kind == REMOVED] == [(REMOVED, "a+b.jpg")]


def s3_record(name: str, key: str, sequencer: str, **object_fields) -> dict:
    return {
        "eventName": name,
        "eventTime": "2026-11-30T10:00:00.000Z",
        "s3": {"bucket": {"name": "photos"}, "object": {"key": key, "sequencer": sequencer, **object_fields}},
    }


def test_an_sns_wrapped_notification_reads_as_s3_s_own():
    s3_message = {"Records": [s3_record("ObjectCreated:Put", "my+photo%21.jpg", "0A", eTag="abc", size=3)]}
    sns = {"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": json.dumps(s3_message)}
    assert parse_message(json.dumps(sns)) == [
        ObjectEvent(CREATED, "photos", "my photo!.jpg", "0A", "abc", 3, "2026-11-30T10:00:00.000Z")
    ]


def test_eventbridge_events_carry_keys_as_they_are():
    event = {
        "source": "aws.s3",
        "detail-type": "Object Deleted",
        "time": "2026-11-30T10:00:00Z",
        "detail": {"bucket": {"name": "photos"}, "object": {"key": "a+b c.jpg", "sequencer": "0064D3901D00059242"}},
    }
    assert parse_message(json.dumps(event)) == [
        ObjectEvent(REMOVED, "photos", "a+b c.jpg", "0064D3901D00059242", time="2026-11-30T10:00:00Z")
    ]
    assert parse_message(json.dumps({**event, "detail-type": "Object Restore Completed"})) == []


def test_a_versioned_bucket_s_permanent_deletion_of_one_version_is_told_apart():
    """Only ``ObjectRemoved:Delete`` with a version id ("null" too: a version written before
    versioning was enabled, or while suspended) may leave another version current; a delete
    marker, and an unversioned bucket's deletion (no version id), remove the object."""

    def one_version(name: str, **fields) -> bool:
        [event] = parse_message(json.dumps({"Records": [s3_record(name, "a.jpg", "0C", **fields)]}))
        return event.kind == REMOVED and event.one_version

    assert one_version("ObjectRemoved:Delete", versionId="3HL4kqtJvjVBH40Nrjfkd")
    assert not one_version("ObjectRemoved:Delete")
    assert one_version("ObjectRemoved:Delete", versionId="null")
    assert not one_version("ObjectRemoved:DeleteMarkerCreated", versionId="3HL4kqtJvjVBH40Nrjfkd")
    detail = {"bucket": {"name": "photos"}, "object": {"key": "a.jpg", "version-id": "3HL4", "sequencer": "0C"}}
    bridge = {"source": "aws.s3", "detail-type": "Object Deleted", "detail": detail}
    [permanent] = parse_message(json.dumps({**bridge, "detail": {**detail, "deletion-type": "Permanently Deleted"}}))
    [marker] = parse_message(json.dumps({**bridge, "detail": {**detail, "deletion-type": "Delete Marker Created"}}))
    assert permanent.one_version and not marker.one_version


def test_test_events_and_other_kinds_of_event_are_no_object_events():
    assert parse_message(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos"})) == []
    restore = {"Records": [s3_record("ObjectRestore:Completed", "a.jpg", "0B")]}
    assert parse_message(json.dumps(restore)) == []


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        b"\xff\xfe",
        "[1, 2]",
        json.dumps({"hello": "world"}),
        json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}),
        json.dumps({"Records": [s3_record("ObjectCreated:Put", "a.jpg", "0A", size="big")]}),
        json.dumps({"source": "aws.s3", "detail-type": "Object Created", "detail": {"object": {}}}),
    ],
    ids=["text", "bytes", "array", "other-json", "no-s3", "bad-size", "eventbridge-no-bucket"],
)
def test_a_message_that_is_not_an_s3_event_is_a_clear_error(body):
    with pytest.raises(MalformedEventError):
        parse_message(body)


def test_the_later_event_of_a_key_is_told_by_its_sequencer():
    def event(sequencer: str, kind: str = CREATED) -> ObjectEvent:
        return ObjectEvent(kind, "photos", "a.jpg", sequencer)

    put, delete = event("0055AED6DCD90281E5"), event("0055AED6DCD90281E6", REMOVED)
    assert later(put, delete) is delete and later(delete, put) is delete
    assert later(event("0A"), event("09FF")) == event("0A"), "padded on the right: 0A00 > 09FF"
    assert later(event("0a"), event("0B")) == event("0B"), "hexadecimal, whatever the case"
