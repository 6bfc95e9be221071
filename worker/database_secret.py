"""The results database's credentials from AWS Secrets Manager, so no password sits in a file.

With ``CELEBSCAN_DATABASE_SECRET_ARN`` set, the secret's JSON (the shape RDS uses: ``username``,
``password``, and optionally ``host``, ``port``, ``dbname``) completes ``CELEBSCAN_DATABASE_URL``.
An RDS-managed master secret holds only the user name and password; the host, port and database
name then come from the URL (``postgresql+psycopg2://HOST:5432/celebscan``).
"""

from __future__ import annotations

import json

from sqlalchemy.engine import URL, make_url

from worker.aws import AWS_ERRORS, client, translate
from worker.errors import ConfigurationError
from worker.settings import DEFAULT_DATABASE_URL, Settings

_POSTGRES_BASE = "postgresql+psycopg2://"


def database_url(settings: Settings) -> str:
    """The URL to connect with: ``settings.database_url``, completed from the secret when one is set."""
    if not settings.database_secret_arn:
        return settings.database_url
    base = settings.database_url if settings.database_url != DEFAULT_DATABASE_URL else _POSTGRES_BASE
    return complete_url(make_url(base), _secret(settings)).render_as_string(hide_password=False)


def complete_url(url: URL, secret: dict) -> URL:
    if "password" not in secret:
        raise ConfigurationError("the database secret has no 'password' field")
    port = secret.get("port")
    return url.set(
        username=secret.get("username") or url.username,
        password=secret["password"],
        host=secret.get("host") or url.host,
        port=int(port) if port else url.port,
        database=secret.get("dbname") or url.database,
    )


def _secret(settings: Settings) -> dict:
    arn = settings.database_secret_arn
    try:
        response = client("secretsmanager", settings).get_secret_value(SecretId=arn)
    except AWS_ERRORS as exc:
        raise ConfigurationError(str(translate(exc, f"reading the database secret {arn}"))) from exc
    try:
        secret = json.loads(response.get("SecretString") or "")
    except ValueError as exc:
        raise ConfigurationError(f"the database secret {arn} is not JSON") from exc
    if not isinstance(secret, dict):
        raise ConfigurationError(f"the database secret {arn} is not a JSON object")
    return secret
