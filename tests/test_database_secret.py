"""Database credentials from Secrets Manager (moto's server) instead of the URL."""

import json

import boto3
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from producer.cli import cli
from worker.database_secret import complete_url, database_url
from worker.errors import ConfigurationError
from worker.settings import Settings


@pytest.fixture
def secrets(aws_env, moto_url, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_url)
    return boto3.session.Session().client("secretsmanager")


def test_an_rds_managed_secret_completes_the_url_and_odd_passwords_survive():
    url = complete_url(
        make_url("postgresql+psycopg2://db.internal:5432/celebscan"),
        {"username": "celebscan", "password": "p@ss:w/rd%?#"},
    )
    parsed = make_url(url.render_as_string(hide_password=False))
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "celebscan",
        "p@ss:w/rd%?#",
        "db.internal",
        5432,
        "celebscan",
    )


def test_a_full_secret_overrides_the_url():
    url = complete_url(
        make_url("postgresql+psycopg2://"),
        {"username": "u", "password": "p", "host": "h", "port": "6543", "dbname": "d"},
    )
    assert (url.username, url.host, url.port, url.database) == ("u", "h", 6543, "d")


def test_a_secret_without_a_password_is_refused():
    with pytest.raises(ConfigurationError, match="no 'password'"):
        complete_url(make_url("postgresql+psycopg2://h/d"), {"username": "u"})


@pytest.mark.slow
def test_the_cli_connects_with_the_secret(secrets, postgres_url):
    server = make_url(postgres_url)
    arn = secrets.create_secret(
        Name="celebscan/db",
        SecretString=json.dumps(
            {
                "username": server.username,
                "password": "not-needed-with-trust-auth",
                "host": server.host,
                "port": server.port,
                "dbname": server.database,
            }
        ),
    )["ARN"]
    env = {"CELEBSCAN_DATABASE_SECRET_ARN": arn, "CELEBSCAN_DATABASE_URL": ""}
    result = CliRunner().invoke(cli, ["metrics"], env=env)
    assert result.exit_code == 0, result.output
    assert "pending images: 0" in result.output
    assert make_url(database_url(Settings.from_env(env))).host == server.host


def test_a_missing_secret_is_a_clear_error(secrets):
    env = {"CELEBSCAN_DATABASE_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf"}
    result = CliRunner().invoke(cli, ["metrics"], env=env)
    assert result.exit_code == 1
    assert "reading the database secret arn:aws:secretsmanager" in result.output
