"""deploy/: the CloudFormation template, its user-data and the systemd units, checked as far as this
machine allows (cfn-lint, the IAM policy's exact actions, shellcheck, systemd-analyze verify), with and
without a followed bucket (FollowSource): its queue, as `follow --setup` finds it on moto's SQS."""

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from cfnlint.api import lint_file
from cfnlint.decode import decode_str

from producer import event_queue, follow
from producer.metrics import CLOUDWATCH_METRICS
from tests.conftest import unavailable

PROJECT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = PROJECT / "deploy" / "aws" / "celebscan.yaml"
SYSTEMD = PROJECT / "deploy" / "systemd"
UNITS = (
    "celebscan-worker.service",
    "celebscan-metrics.service",
    "celebscan-metrics.timer",
    "celebscan-events.service",
)
NO_VALUE = {"Ref": "AWS::NoValue"}
EVENTS_QUEUE_ARN = {"Fn::GetAtt": ["EventsQueue", "Arn"]}


@pytest.fixture(scope="module")
def template() -> dict:
    decoded, errors = decode_str(TEMPLATE_PATH.read_text())
    assert not errors
    return decoded


def resources(template: dict, kind: str) -> dict:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def resolved(node, follow: bool):
    """``node`` as CloudFormation deploys it with FollowSource set (``follow``) or empty: each
    ``Fn::If`` on the Follow condition decided, and AWS::NoValue dropped from lists."""
    if isinstance(node, dict):
        if set(node) == {"Fn::If"} and node["Fn::If"][0] == "Follow":
            return resolved(node["Fn::If"][1 if follow else 2], follow)
        return {key: resolved(value, follow) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(item, follow) for item in node if resolved(item, follow) != NO_VALUE]
    return node


def deployed(template: dict, follow: bool) -> dict:
    """The resources created with FollowSource set or empty, resolved."""
    return {
        name: resolved(resource, follow)
        for name, resource in template["Resources"].items()
        if follow or resource.get("Condition") != "Follow"
    }


def user_data(template: dict) -> tuple[str, dict]:
    data = template["Resources"]["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    script, variables = data["Fn::Base64"]["Fn::Sub"]
    return str(script), variables


def test_cfn_lint_accepts_the_template():
    assert [str(match) for match in lint_file(TEMPLATE_PATH)] == []


def role_statements(template: dict, follow: bool) -> list[dict]:
    role = deployed(template, follow)["WorkerRole"]["Properties"]
    assert "ManagedPolicyArns" not in role
    return [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]


def test_the_worker_role_grants_exactly_the_listed_actions(template):
    assert set(resources(template, "AWS::IAM::Role")) == {"WorkerRole"}
    assert not resources(template, "AWS::IAM::Policy") and not resources(template, "AWS::IAM::ManagedPolicy")
    statements = role_statements(template, follow=False)
    assert all(s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s for s in statements)
    by_action = {s["Action"]: s for s in statements}
    assert len(by_action) == len(statements), "one statement per action"
    assert set(by_action) == {
        "s3:ListBucket",
        "s3:GetObject",
        "rekognition:RecognizeCelebrities",
        "cloudwatch:PutMetricData",
        "secretsmanager:GetSecretValue",
    }

    listing = by_action["s3:ListBucket"]
    assert listing["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ImageBucket}"}
    assert listing["Condition"] == {"StringLike": {"s3:prefix": {"Fn::Sub": "${ImagePrefix}*"}}}
    assert by_action["s3:GetObject"]["Resource"] == {
        "Fn::Sub": "arn:${AWS::Partition}:s3:::${ImageBucket}/${ImagePrefix}*"
    }
    namespace = {"Fn::Sub": "Celebscan/${AWS::StackName}"}
    assert by_action["cloudwatch:PutMetricData"]["Condition"] == {"StringEquals": {"cloudwatch:namespace": namespace}}
    assert by_action["secretsmanager:GetSecretValue"]["Resource"] == {
        "Fn::If": [
            "CreateDatabase",
            {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]},
            {"Ref": "ExistingDatabaseSecretArn"},
        ]
    }


def test_a_followed_bucket_adds_exactly_its_queues_three_actions(template):
    """With FollowSource set the instances may receive, delete and count the messages of the events
    queue, and nothing else more; with it empty, nothing about SQS at all."""
    assert template["Conditions"]["Follow"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "FollowSource"}, ""]}]}
    assert template["Parameters"]["FollowSource"]["Default"] == ""
    assert not any(s["Action"].startswith("sqs:") for s in role_statements(template, follow=False))
    without = {json.dumps(s, sort_keys=True) for s in role_statements(template, follow=False)}
    added = [s for s in role_statements(template, follow=True) if json.dumps(s, sort_keys=True) not in without]
    assert sorted(s["Action"] for s in added) == ["sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ReceiveMessage"]
    for statement in added:
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        assert statement["Resource"] == EVENTS_QUEUE_ARN, "that queue only"


def test_the_events_queue_is_what_follow_setup_makes(template):
    """The queue, its dead-letter queue and its policy: only with FollowSource, named so that
    `follow --setup --queue-name STACK-events` finds them, with producer/event_queue.py's settings."""
    conditional = {name for name, r in template["Resources"].items() if r.get("Condition") == "Follow"}
    assert {"EventsQueue", "EventsDeadLetterQueue", "EventsQueuePolicy", "EventsWaitingAlarm"} <= conditional
    assert not resources(template, "AWS::SQS::Queue").keys() - conditional
    queue = template["Resources"]["EventsQueue"]["Properties"]
    dead_letter = template["Resources"]["EventsDeadLetterQueue"]["Properties"]
    assert queue["QueueName"] == {"Fn::Sub": "${AWS::StackName}-events"}
    assert dead_letter["QueueName"] == {"Fn::Sub": "${AWS::StackName}-events-dlq"}, "--setup adds -dlq to the name"
    assert queue["MessageRetentionPeriod"] == dead_letter["MessageRetentionPeriod"] == event_queue.RETENTION_SECONDS
    assert queue["ReceiveMessageWaitTimeSeconds"] == event_queue.WAIT_SECONDS
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["EventsDeadLetterQueue", "Arn"]},
        "maxReceiveCount": event_queue.MAX_RECEIVES,
    }
    policy = template["Resources"]["EventsQueuePolicy"]["Properties"]
    assert policy["Queues"] == [{"Ref": "EventsQueue"}]
    [statement] = policy["PolicyDocument"]["Statement"]
    assert (statement["Effect"], statement["Principal"], statement["Action"], statement["Resource"]) == (
        "Allow",
        {"Service": "s3.amazonaws.com"},
        "sqs:SendMessage",
        EVENTS_QUEUE_ARN,
    )
    followed_bucket = {"Fn::Select": [2, {"Fn::Split": ["/", {"Ref": "FollowSource"}]}]}
    assert statement["Condition"] == {
        "ArnEquals": {
            "aws:SourceArn": {
                "Fn::Sub": ["arn:${AWS::Partition}:s3:::${FollowedBucket}", {"FollowedBucket": followed_bucket}]
            }
        },
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}},
    }
    pattern = re.compile(template["Parameters"]["FollowSource"]["AllowedPattern"])
    assert pattern.match("") and pattern.match("s3://my-bucket/photos/") and pattern.match("s3://my.bucket/")
    assert not pattern.match("photos/") and not pattern.match("s3://b/it's") and not pattern.match("s3://my-bucket")
    outputs = template["Outputs"]
    assert (outputs["EventsQueueUrl"]["Condition"], outputs["EventsQueueUrl"]["Value"]) == (
        "Follow",
        {"Ref": "EventsQueue"},
    )
    assert outputs["EventsQueueName"]["Value"] == {"Fn::GetAtt": ["EventsQueue", "QueueName"]}


def test_follow_setup_finds_the_stacks_queues_and_adds_the_bucket(template, aws_env, moto_url, s3, bucket, monkeypatch):
    """The stack's queues made as the template says (on moto), then the documented one-time
    `celebscan follow SOURCE --setup --queue-name STACK-events`: it makes no other queue and adds the
    bucket's notification configuration to the stack's queue."""
    import boto3
    from click.testing import CliRunner

    from producer.cli import cli

    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_url)
    sqs = boto3.client("sqs")
    name = f"stack-{bucket[-8:]}-events"
    queue, dead_letter = (template["Resources"][r]["Properties"] for r in ("EventsQueue", "EventsDeadLetterQueue"))
    dead_letter_url = sqs.create_queue(
        QueueName=f"{name}-dlq", Attributes={"MessageRetentionPeriod": str(dead_letter["MessageRetentionPeriod"])}
    )["QueueUrl"]
    dead_letter_arn = sqs.get_queue_attributes(QueueUrl=dead_letter_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = {"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": queue["RedrivePolicy"]["maxReceiveCount"]}
    attributes = {
        "MessageRetentionPeriod": str(queue["MessageRetentionPeriod"]),
        "ReceiveMessageWaitTimeSeconds": str(queue["ReceiveMessageWaitTimeSeconds"]),
        "RedrivePolicy": json.dumps(redrive),
    }
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    before = set(sqs.list_queues().get("QueueUrls", []))

    result = CliRunner().invoke(
        cli,
        ["follow", f"s3://{bucket}/photos/", "--setup", "--queue-name", name],
        env={"CELEBSCAN_DATABASE_URL": "sqlite://"},
    )
    assert result.exit_code == 0, result.output
    assert f"queue: {url}" in result.output and f"dead-letter queue: {dead_letter_arn}" in result.output
    assert set(sqs.list_queues().get("QueueUrls", [])) == before, "no other queue"
    [configuration] = s3.get_bucket_notification_configuration(Bucket=bucket)["QueueConfigurations"]
    assert (
        configuration["QueueArn"]
        == sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    )
    set_up = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert json.loads(set_up["RedrivePolicy"]) == redrive and set_up["MessageRetentionPeriod"] == "1209600"


def test_only_the_workers_reach_redis_and_postgresql(template):
    for group, port in (("RedisSecurityGroup", 6379), ("DatabaseSecurityGroup", 5432)):
        rules = template["Resources"][group]["Properties"]["SecurityGroupIngress"]
        assert rules == [
            {
                "IpProtocol": "tcp",
                "FromPort": port,
                "ToPort": port,
                "SourceSecurityGroupId": {"Ref": "WorkerSecurityGroup"},
            }
        ], group
    assert template["Resources"]["Database"]["Properties"]["PubliclyAccessible"] is False


def test_the_database_password_never_reaches_user_data(template):
    database = template["Resources"]["Database"]["Properties"]
    assert database["ManageMasterUserPassword"] is True and "MasterUserPassword" not in database
    script, variables = user_data(template)
    referenced = set(re.findall(r"\$\{([^}!]+)\}", script))
    assert referenced <= {
        "CelebscanPackage",
        "WorkerConcurrency",
        "CallsInFlight",
        "RekognitionTps",
        "FollowSource",
        "FollowBackend",
        "AWS::StackName",
        "AWS::Region",
        *variables,
    }
    assert set(variables) == {"BrokerUrl", "DatabaseUrl", "DatabaseSecretArn", "EventsQueueUrl"}
    assert "password" not in str(variables).lower()


def test_user_data_installs_the_units_shipped_in_deploy_systemd(template):
    script, _ = user_data(template)
    embedded = dict(re.findall(r"cat > /etc/systemd/system/(\S+) <<'UNIT'\n(.*?)\nUNIT\n", script, re.S))
    assert set(embedded) == set(UNITS)
    for unit in UNITS:
        assert embedded[unit] + "\n" == (SYSTEMD / unit).read_text(), f"{unit} differs from deploy/systemd/{unit}"
    assert "systemctl enable --now celebscan-worker.service celebscan-metrics.timer\n" in script


def test_user_data_runs_the_events_unit_when_following(template):
    """The env file the units read holds the source and the queue; the events unit starts only
    when FollowSource is set (with it empty, `celebscan follow` would stop at once, and restart)."""
    script, variables = user_data(template)
    settings = re.search(r"<<'SETTINGS'\n(.*?)\nSETTINGS\n", script, re.S).group(1).splitlines()
    assert {"CELEBSCAN_FOLLOW_SOURCE=${FollowSource}", "CELEBSCAN_EVENTS_QUEUE_URL=${EventsQueueUrl}"} <= set(settings)
    assert "CELEBSCAN_FOLLOW_BACKEND=${FollowBackend}" in settings
    assert variables["EventsQueueUrl"] == {"Fn::If": ["Follow", {"Ref": "EventsQueue"}, ""]}
    assert "follow_source='${FollowSource}'\n" in script
    assert 'if [ -n "$follow_source" ]; then\n  systemctl enable --now celebscan-events.service\nfi\n' in script
    assert script.count("celebscan-events.service") == 2, "written, and enabled only under the condition"
    for unit in ("celebscan-worker.service", "celebscan-metrics.service", "celebscan-events.service"):
        assert "EnvironmentFile=/etc/celebscan/celebscan.env" in (SYSTEMD / unit).read_text()


def alarm_metrics(alarm: dict) -> list[tuple]:
    """(namespace, metric name, dimensions) of every metric an alarm reads, plain or in metric math."""
    properties = alarm["Properties"]
    if "MetricName" in properties:
        return [(properties["Namespace"], properties["MetricName"], properties.get("Dimensions", []))]
    metrics = [query["MetricStat"]["Metric"] for query in properties["Metrics"] if "MetricStat" in query]
    return [(metric["Namespace"], metric["MetricName"], metric.get("Dimensions", [])) for metric in metrics]


@pytest.mark.parametrize("follow", [False, True], ids=["not following", "following"])
def test_scaling_alarms_read_what_celebscan_publishes(template, follow):
    """Celebscan's own metrics, and with a followed bucket SQS's figures of its events queue: while
    the group is at zero nobody publishes the backlog, so they wake it and keep it awake."""
    script, _ = user_data(template)
    assert "CELEBSCAN_CLOUDWATCH_NAMESPACE=Celebscan/${AWS::StackName}" in script
    alarms = {name: r for name, r in deployed(template, follow).items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    namespace = {"Fn::Sub": "Celebscan/${AWS::StackName}"}
    queue = [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["EventsQueue", "QueueName"]}}]
    read = {metric for alarm in alarms.values() for metric in map(json.dumps, alarm_metrics(alarm))}
    ours = {json.loads(metric)[1] for metric in read if json.loads(metric)[0] == namespace}
    others = [json.loads(metric) for metric in read if json.loads(metric)[0] != namespace]
    assert ours <= set(CLOUDWATCH_METRICS) and {"BacklogPerWorker", "BacklogImages"} <= ours
    if not follow:
        assert others == [] and "EventsWaitingAlarm" not in alarms
        assert alarms["ScaleToZeroAlarm"]["Properties"]["Metrics"] == [
            {
                "Id": "backlog",
                "MetricStat": {
                    "Metric": {"Namespace": namespace, "MetricName": "BacklogImages"},
                    "Period": 60,
                    "Stat": "Maximum",
                },
                "ReturnData": True,
            }
        ]
    else:
        assert sorted(others) == [
            ["AWS/SQS", "ApproximateAgeOfOldestMessage", queue],
            ["AWS/SQS", "ApproximateNumberOfMessagesVisible", queue],
        ]
        to_zero = alarms["ScaleToZeroAlarm"]["Properties"]["Metrics"]
        assert [query.get("ReturnData") for query in to_zero] == [False, False, True]
        assert to_zero[2]["Expression"] == "MAX([FILL(backlog, 0), FILL(events, 0)])"
        assert [query["Id"] for query in to_zero[:2]] == ["backlog", "events"]
        wake = alarms["EventsWaitingAlarm"]["Properties"]
        assert wake["AlarmActions"] == [{"Ref": "ScaleOutPolicy"}]
        assert (wake["ComparisonOperator"], wake["TreatMissingData"]) == ("GreaterThanThreshold", "notBreaching")
    to_zero = template["Resources"]["ScaleToZeroPolicy"]["Properties"]
    assert to_zero["AdjustmentType"] == "ExactCapacity" and to_zero["StepAdjustments"][0]["ScalingAdjustment"] == 0
    assert template["Parameters"]["MinWorkers"]["Default"] == 0


def test_user_data_passes_shellcheck(template, tmp_path):
    if not shutil.which("shellcheck"):
        unavailable("shellcheck is not installed: apt-get install shellcheck")
    script, _ = user_data(template)
    rendered = re.sub(r"\$\{[^}]+\}", "sample", script)
    (tmp_path / "user-data.sh").write_text(rendered)
    wrapper = re.search(r"<<'WRAPPER'\n(.*?)\nWRAPPER\n", rendered, re.S).group(1)
    (tmp_path / "celebscan").write_text(wrapper + "\n")
    result = subprocess.run(["shellcheck", "user-data.sh", "celebscan"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_systemd_units_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        unavailable("systemd-analyze is not installed: apt-get install systemd")
    bin_dir = Path(shutil.which("celery")).parent
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace("/opt/celebscan/bin/", f"{bin_dir}/")
        (tmp_path / unit).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *UNITS], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for unit in ("celebscan-worker.service", "celebscan-events.service"):  # warm shutdowns
        text = (SYSTEMD / unit).read_text()
        assert "KillSignal=SIGTERM" in text and "Restart=always" in text, unit


def test_the_units_run_the_real_commands():
    worker = (SYSTEMD / "celebscan-worker.service").read_text()
    assert "ExecStart=/opt/celebscan/bin/celery -A worker.celery_app worker --hostname" in worker
    metrics = (SYSTEMD / "celebscan-metrics.service").read_text()
    assert "ExecStart=/opt/celebscan/bin/celebscan metrics --cloudwatch" in metrics
    assert textwrap.dedent(worker) == worker


def unit_settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_events_unit_follows_from_the_settings_as_the_worker_runs():
    """`celebscan follow` with no argument (the source and queue come from the env file), as the
    worker's user with the worker's env file, and a stop that outlasts a receive's long poll."""
    events = unit_settings((SYSTEMD / "celebscan-events.service").read_text())
    worker = unit_settings((SYSTEMD / "celebscan-worker.service").read_text())
    assert events["ExecStart"] == ["/opt/celebscan/bin/celebscan follow"]
    for key in ("User", "Group", "EnvironmentFile", "StateDirectory", "WorkingDirectory", "WantedBy", "After"):
        assert events[key] == worker[key], key
    assert events["KillSignal"] == ["SIGTERM"] and events["Restart"] == ["always"]
    [stop] = events["TimeoutStopSec"]
    assert int(stop) > follow.WAIT_SECONDS + 10, "a stop waits for the receive in hand (a long poll) to finish"
