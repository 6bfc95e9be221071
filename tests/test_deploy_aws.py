"""deploy/: the CloudFormation template, its user-data and the systemd units, checked as far as this
machine allows (cfn-lint, the IAM policy's exact actions, shellcheck, systemd-analyze verify)."""

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from cfnlint.api import lint_file
from cfnlint.decode import decode_str

from producer.metrics import CLOUDWATCH_METRICS
from tests.conftest import unavailable

PROJECT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = PROJECT / "deploy" / "aws" / "celebscan.yaml"
SYSTEMD = PROJECT / "deploy" / "systemd"
UNITS = ("celebscan-worker.service", "celebscan-metrics.service", "celebscan-metrics.timer")


@pytest.fixture(scope="module")
def template() -> dict:
    decoded, errors = decode_str(TEMPLATE_PATH.read_text())
    assert not errors
    return decoded


def resources(template: dict, kind: str) -> dict:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def user_data(template: dict) -> tuple[str, dict]:
    data = template["Resources"]["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    script, variables = data["Fn::Base64"]["Fn::Sub"]
    return str(script), variables


def test_cfn_lint_accepts_the_template():
    assert [str(match) for match in lint_file(TEMPLATE_PATH)] == []


def test_the_worker_role_grants_exactly_the_listed_actions(template):
    assert set(resources(template, "AWS::IAM::Role")) == {"WorkerRole"}
    assert not resources(template, "AWS::IAM::Policy") and not resources(template, "AWS::IAM::ManagedPolicy")
    role = template["Resources"]["WorkerRole"]["Properties"]
    assert "ManagedPolicyArns" not in role
    statements = [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]
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
        "AWS::StackName",
        "AWS::Region",
        *variables,
    }
    assert set(variables) == {"BrokerUrl", "DatabaseUrl", "DatabaseSecretArn"}
    assert "password" not in str(variables).lower()


def test_user_data_installs_the_units_shipped_in_deploy_systemd(template):
    script, _ = user_data(template)
    embedded = dict(re.findall(r"cat > /etc/systemd/system/(\S+) <<'UNIT'\n(.*?)\nUNIT\n", script, re.S))
    assert set(embedded) == set(UNITS)
    for unit in UNITS:
        assert embedded[unit] + "\n" == (SYSTEMD / unit).read_text(), f"{unit} differs from deploy/systemd/{unit}"
    assert "systemctl enable --now celebscan-worker.service celebscan-metrics.timer" in script


def test_scaling_alarms_read_what_celebscan_publishes(template):
    script, _ = user_data(template)
    assert "CELEBSCAN_CLOUDWATCH_NAMESPACE=Celebscan/${AWS::StackName}" in script
    alarms = resources(template, "AWS::CloudWatch::Alarm")
    assert {alarm["Properties"]["MetricName"] for alarm in alarms.values()} <= set(CLOUDWATCH_METRICS)
    for alarm in alarms.values():
        assert alarm["Properties"]["Namespace"] == {"Fn::Sub": "Celebscan/${AWS::StackName}"}
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
    worker = (SYSTEMD / "celebscan-worker.service").read_text()
    assert "KillSignal=SIGTERM" in worker and "Restart=always" in worker  # Celery's warm shutdown


def test_the_units_run_the_real_commands():
    worker = (SYSTEMD / "celebscan-worker.service").read_text()
    assert "ExecStart=/opt/celebscan/bin/celery -A worker.celery_app worker --hostname" in worker
    metrics = (SYSTEMD / "celebscan-metrics.service").read_text()
    assert "ExecStart=/opt/celebscan/bin/celebscan metrics --cloudwatch" in metrics
    assert textwrap.dedent(worker) == worker
