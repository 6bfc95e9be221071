"""boto3 clients built from the settings, and AWS errors turned into celebscan's error tree.

Clients honour boto3's own configuration (profiles, region, ``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL_REKOGNITION``); ``--endpoint-url`` overrides the S3
endpoint only. botocore's own retries are switched off: :mod:`worker.retry` is the one retry policy,
so the two never multiply.
"""

from __future__ import annotations

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ReadTimeoutError,
)

from worker.errors import (
    AccessDeniedError,
    CelebscanError,
    ConfigurationError,
    ImageTooLargeError,
    InvalidImageError,
    ObjectChangedError,
    ObjectMissingError,
    PermanentError,
    ServiceUnavailableError,
    ThrottledError,
)
from worker.settings import Settings

THROTTLING_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
        "LimitExceededException",
    }
)
ACCESS_CODES = frozenset({"AccessDenied", "AccessDeniedException", "Forbidden", "403"})
MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)


def client(service: str, settings: Settings, *, raw_timestamps: bool = False, **config):
    """A boto3 client for ``service`` with botocore's retries off and sane timeouts.

    ``raw_timestamps`` leaves response timestamps as the text the service sent: a listing client
    never reads ``LastModified``, and parsing it was a third of a listing's time (py-spy).
    """
    import boto3

    session = boto3.session.Session()
    if raw_timestamps:
        parsers = session._session.get_component("response_parser_factory")
        parsers.set_parser_defaults(timestamp_parser=str)
    options = {}
    if service == "s3" and settings.endpoint_url:
        options["endpoint_url"] = settings.endpoint_url
    botocore_config = Config(
        retries={"total_max_attempts": 1},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
        **config,
    )
    try:
        return session.client(service, config=botocore_config, **options)
    except NoRegionError as exc:
        raise ConfigurationError(f"{service}: no AWS region configured (set AWS_DEFAULT_REGION or a profile)") from exc


AWS_ERRORS = (ClientError, BotoCoreError)


def translate(exc: ClientError | BotoCoreError, what: str) -> CelebscanError:
    """The celebscan error for a boto3/botocore exception raised while doing ``what``."""
    if isinstance(exc, ClientError):
        return _client_error(exc, what)
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
        return ServiceUnavailableError(f"{what}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return ConfigurationError(f"{what}: no AWS credentials found (set a profile or AWS_ACCESS_KEY_ID)")
    return ServiceUnavailableError(f"{what}: {exc}")


def _client_error(exc: ClientError, what: str) -> CelebscanError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    message = f"{what}: {error.get('Message') or 'error'} ({code or status})"
    if code in THROTTLING_CODES or status == 429:
        return ThrottledError(message, code=code or "ThrottlingException")
    if code in CREDENTIAL_CODES:
        return AccessDeniedError(message, code="InvalidCredentials")
    if code in ACCESS_CODES:
        return AccessDeniedError(message)
    if code == "PreconditionFailed" or status == 412:
        return ObjectChangedError(
            f"{what}: the object changed after it was listed (its ETag is no longer the one listed)"
        )
    if code in MISSING_CODES:
        return ObjectMissingError(message, code="NoSuchBucket" if code == "NoSuchBucket" else "ObjectNotFound")
    if code == "InvalidImageFormatException":
        return InvalidImageError(message, code="InvalidImageFormat")
    if code == "ImageTooLargeException":
        return ImageTooLargeError(message)
    if code == "InvalidS3ObjectException":
        return PermanentError(message, code="InvalidS3Object")
    if code == "InvalidParameterException":
        return PermanentError(message, code="InvalidParameter")
    if status >= 500 or code in ("InternalServerError", "InternalError", "ServiceUnavailable"):
        return ServiceUnavailableError(message, code=code or "ServiceUnavailable")
    return PermanentError(message, code=code or f"HTTP{status}")
