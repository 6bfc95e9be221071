"""Setting up the SQS queue a bucket sends its S3 Event Notifications to, in one step.

The second piece of following a living bucket (issue 21; the ``follow`` command that uses it is
still to come). :func:`set_up_event_queue` creates the queue and its dead-letter queue if missing,
lets only that bucket of that account send to the queue (``aws:SourceArn`` and
``aws:SourceAccount``), and adds a queue configuration for the prefix to the bucket's notification
configuration, keeping every configuration already there. S3 refuses two configurations that share
an event type over overlapping prefixes and suffixes; so does this, with a message naming the one
in the way, before anything is changed on the bucket. Running it again changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: The events a followed source needs: new and overwritten objects, and deleted ones.
EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")
#: A message received this many times without being deleted (it cannot be read) goes to the
#: dead-letter queue instead of coming back for ever.
MAX_RECEIVES = 5
#: The longest SQS keeps a message (14 days): events older than that are caught by a normal scan.
RETENTION_SECONDS = 14 * 24 * 3600
#: Long polling: a receive waits up to this long for a message.
WAIT_SECONDS = 20
CONFIGURATION_KINDS = ("QueueConfigurations", "TopicConfigurations", "LambdaFunctionConfigurations")


class NotificationOverlapError(ValueError):
    """The bucket already sends these events for an overlapping prefix somewhere else."""


@dataclass(frozen=True)
class EventQueue:
    url: str
    arn: str
    dead_letter_arn: str
    configuration_id: str


def set_up_event_queue(s3, sqs, account: str, bucket: str, prefix: str, queue_name: str) -> EventQueue:
    """The queue ``bucket`` sends the events of objects under ``prefix`` to, set up (see above)."""
    configuration_id = f"celebscan-{queue_name}"
    configuration = _without_metadata(s3.get_bucket_notification_configuration(Bucket=bucket))
    _refuse_overlap(configuration, configuration_id, prefix)
    dead_letter_url = sqs.create_queue(
        QueueName=f"{queue_name}-dlq", Attributes={"MessageRetentionPeriod": str(RETENTION_SECONDS)}
    )["QueueUrl"]
    dead_letter_arn = _arn(sqs, dead_letter_url)
    url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    arn = _arn(sqs, url)
    sqs.set_queue_attributes(
        QueueUrl=url,
        Attributes={
            "MessageRetentionPeriod": str(RETENTION_SECONDS),
            "ReceiveMessageWaitTimeSeconds": str(WAIT_SECONDS),
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": MAX_RECEIVES}),
            "Policy": json.dumps(queue_policy(arn, bucket, account)),
        },
    )
    ours = {
        "Id": configuration_id,
        "QueueArn": arn,
        "Events": list(EVENTS),
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}},
    }
    queues = configuration.get("QueueConfigurations", [])
    others = [each for each in queues if each.get("Id") != configuration_id]
    if not any(_same(each, ours) for each in queues):  # a put sends the queue an s3:TestEvent again
        s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={**configuration, "QueueConfigurations": [*others, ours]}
        )
    return EventQueue(url, arn, dead_letter_arn, configuration_id)


def _same(configuration: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether a queue configuration S3 holds is ours as we would write it (S3 may spell the filter
    rule's name ``Prefix``)."""

    def rules(each: dict[str, Any]) -> set[tuple[str, str]]:
        found = each.get("Filter", {}).get("Key", {}).get("FilterRules", [])
        return {(str(rule.get("Name", "")).lower(), str(rule.get("Value", ""))) for rule in found}

    return (
        configuration.get("Id") == ours["Id"]
        and configuration.get("QueueArn") == ours["QueueArn"]
        and set(configuration.get("Events", [])) == set(ours["Events"])
        and rules(configuration) == rules(ours)
    )


def queue_policy(queue_arn: str, bucket: str, account: str) -> dict[str, Any]:
    """S3 may send to the queue for this bucket of this account only."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "S3EventsOfOneBucket",
                "Effect": "Allow",
                "Principal": {"Service": "s3.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {
                    "ArnEquals": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"},
                    "StringEquals": {"aws:SourceAccount": account},
                },
            }
        ],
    }


def _arn(sqs, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def _without_metadata(response: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in response.items() if name != "ResponseMetadata"}


def _refuse_overlap(configuration: dict[str, Any], configuration_id: str, prefix: str) -> None:
    for kind in CONFIGURATION_KINDS:
        for other in configuration.get(kind, []):
            if other.get("Id") == configuration_id:
                continue  # ours, from an earlier run: replaced
            if _events_overlap(other.get("Events", []), EVENTS) and _prefixes_overlap(_rule(other, "prefix"), prefix):
                target = other.get("QueueArn") or other.get("TopicArn") or other.get("LambdaFunctionArn")
                raise NotificationOverlapError(
                    f"the bucket already sends {', '.join(other.get('Events', []))} for prefix "
                    f"{_rule(other, 'prefix')!r} to {target} (configuration {other.get('Id')!r}); S3 allows one "
                    f"destination per event and key: narrow that configuration's prefix, or follow through it"
                )


def _rule(configuration: dict[str, Any], name: str) -> str:
    rules = configuration.get("Filter", {}).get("Key", {}).get("FilterRules", [])
    return next((rule["Value"] for rule in rules if rule.get("Name", "").lower() == name), "")


def _events_overlap(theirs: list[str], ours: tuple[str, ...]) -> bool:
    def family(event: str) -> str:
        return event.rsplit(":", 1)[0] if event.endswith("*") else event

    return any(family(a).startswith(family(b)) or family(b).startswith(family(a)) for a in theirs for b in ours)


def _prefixes_overlap(theirs: str, ours: str) -> bool:
    return theirs.startswith(ours) or ours.startswith(theirs)
