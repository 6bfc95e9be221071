"""Secrets stay out of output, logs and results; folders are not escaped through symlinks."""

import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner

from producer.cli import cli
from tests.celery_workers import celery_workers, wait_for_scan
from tests.imagemaker import jpeg
from worker.aws import translate
from worker.database import masked_url
from worker.store import ResultStore


def test_symlinks_out_of_the_folder_are_not_followed(tmp_path, sqlite_url):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg())
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "mine.jpg").write_bytes(jpeg())
    (folder / "link.jpg").symlink_to(outside / "secret.jpg")
    (folder / "linked-dir").symlink_to(outside, target_is_directory=True)
    (folder / "inside-link.jpg").symlink_to(folder / "mine.jpg")
    from worker.listing import list_folder

    assert sorted(o.key for o in list_folder(folder)) == ["inside-link.jpg", "mine.jpg"]


def test_reader_refuses_keys_that_lead_outside_the_folder(tmp_path):
    from worker.errors import AccessDeniedError
    from worker.sources import FolderReader

    (tmp_path / "outside.jpg").write_bytes(jpeg())
    (tmp_path / "photos").mkdir()
    with pytest.raises(AccessDeniedError):
        FolderReader(10**6).read(str(tmp_path / "photos"), "../outside.jpg")


def test_masked_url_hides_the_password():
    assert masked_url("postgresql+psycopg2://scan:pa55@db/x") == "postgresql+psycopg2://scan:***@db/x"


@pytest.mark.parametrize(
    "code, status, expected",
    [
        ("InvalidAccessKeyId", 403, "InvalidCredentials"),
        ("SignatureDoesNotMatch", 403, "InvalidCredentials"),
        ("AccessDenied", 403, "AccessDenied"),
        ("NoSuchKey", 404, "ObjectNotFound"),
        ("NoSuchBucket", 404, "NoSuchBucket"),
        ("ProvisionedThroughputExceededException", 400, "ProvisionedThroughputExceededException"),
        ("SlowDown", 503, "SlowDown"),
        ("InternalServerError", 500, "InternalServerError"),
        ("InvalidImageFormatException", 400, "InvalidImageFormat"),
        ("ImageTooLargeException", 400, "ImageTooLarge"),
        ("InvalidParameterException", 400, "InvalidParameter"),
    ],
)
def test_aws_errors_get_celebscan_codes(code, status, expected):
    error = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")
    assert translate(error, "doing").code == expected


@pytest.mark.slow
def test_no_secret_in_cli_output_worker_logs_or_results(
    aws_env, rekognition, broker_url, postgres_url, s3, bucket, tmp_path, monkeypatch
):
    from tests.conftest import _reset_postgres

    _reset_postgres(postgres_url)
    db_secret, aws_secret = "db-Secret-4217", "aws-Secret-9931"
    # The test servers trust loopback connections (Redis has no password set, and accepts any), so
    # any password is accepted: the point is where it shows.
    url_with_password = postgres_url.replace("postgres@", f"postgres:{db_secret}@")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    s3.put_object(Bucket=bucket, Key="a.jpg", Body=jpeg())
    env = {
        **aws_env,
        "AWS_SECRET_ACCESS_KEY": aws_secret,
        "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url,
        "CELERY_BROKER_URL": broker_url.replace("redis://", "redis://:redis-Secret-1@"),
        "CELEBSCAN_DATABASE_URL": url_with_password,
        "CELEBSCAN_BACKEND": "rekognition",
    }
    runner = CliRunner()
    outputs = [runner.invoke(cli, ["scan", f"s3://{bucket}/"], env=env, catch_exceptions=False).output]
    assert "handing out batches through redis://" in outputs[0]
    store = ResultStore.connect(postgres_url)
    with celery_workers(1, env, tmp_path):
        wait_for_scan(store, store.latest_scan_id())
    for command in (["--help"], ["scan", "--help"], ["status"], ["results"]):
        outputs.append(runner.invoke(cli, command, env=env, catch_exceptions=False).output)
    text = "\n".join(outputs) + (tmp_path / "worker0.log").read_text()
    for secret in (db_secret, aws_secret, "redis-Secret-1"):
        assert secret not in text
    assert "postgres:***@" in outputs[0] and "redis://:**@" in outputs[0]
