"""Setting up where Rekognition Video announces its finished jobs, in one step (``celebscan
video-jobs --setup``): an SNS topic, an SQS queue subscribed to it that only that topic may send
to, and the IAM role Rekognition Video assumes to publish there. Running it again changes nothing.

Workers then start each job with the topic and role as its ``NotificationChannel``, and read the
queue (``worker/videos/completions.py``); without this, they poll each job with a growing wait.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from worker.aws import client
from worker.settings import Settings

#: SQS keeps a completion message this long: a fleet stopped for days still finds its jobs (a job's
#: results stay readable for 7 days; after that, every video still looks at its job itself).
RETENTION_SECONDS = 4 * 24 * 3600


@dataclass(frozen=True)
class VideoNotifications:
    topic_arn: str
    queue_url: str
    role_arn: str


def set_up(settings: Settings, name: str) -> VideoNotifications:
    """The topic ``AmazonRekognition-NAME``, the queue ``NAME``, and the role ``NAME-publisher``."""
    sns, sqs, iam = client("sns", settings), client("sqs", settings), client("iam", settings)
    topic_arn = sns.create_topic(Name=f"AmazonRekognition-{name}")["TopicArn"]
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.set_queue_attributes(
        QueueUrl=queue_url,
        Attributes={
            "MessageRetentionPeriod": str(RETENTION_SECONDS),
            "Policy": json.dumps(queue_policy(queue_arn, topic_arn)),
        },
    )
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)  # the same subscription when run again
    role_name = f"{name}-publisher"
    try:
        role_arn = iam.get_role(RoleName=role_name)["Role"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        role_arn = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(_trust()))["Role"]["Arn"]
    iam.put_role_policy(
        RoleName=role_name, PolicyName="publish-video-jobs", PolicyDocument=json.dumps(_publish(topic_arn))
    )
    return VideoNotifications(topic_arn, queue_url, role_arn)


def queue_policy(queue_arn: str, topic_arn: str) -> dict[str, Any]:
    """The topic, and nothing else, may send to the queue."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "VideoJobsTopicOnly",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }
        ],
    }


def _trust() -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "rekognition.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }


def _publish(topic_arn: str) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sns:Publish", "Resource": topic_arn}]}
