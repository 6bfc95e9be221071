"""Fixtures for real resources: databases (SQLite and a real PostgreSQL), the dev photo set, the face models.

A server whose programs are missing skips its tests with the install command as the reason, except
under CI (``CI=true``), where a missing server is a failure.
"""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.servers import ServerUnavailable, postgres_server
from worker.store import ResultStore

PROJECT = Path(__file__).resolve().parent.parent
FACES_DEV = PROJECT.parent / "shared" / "datasets" / "faces-dev"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (required under CI)")
    pytest.skip(reason)


def serve(server):
    """Yield the URL of a server context manager, or skip (fail under CI) when it is not installed."""
    try:
        with server() as url:
            yield url
    except ServerUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def postgres_url():
    yield from serve(postgres_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database of each kind; PostgreSQL's schema is wiped before and after each test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'celebscan.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    _reset_postgres(url)
    yield url
    _reset_postgres(url)


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def store(database_url):
    result_store = ResultStore.connect(database_url)
    yield result_store
    result_store.engine.dispose()


@pytest.fixture
def pg_store(postgres_url):
    """A store on the real PostgreSQL server, emptied before and after the test."""
    _reset_postgres(postgres_url)
    result_store = ResultStore.connect(postgres_url)
    yield result_store
    result_store.engine.dispose()
    _reset_postgres(postgres_url)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'celebscan.db'}"


@pytest.fixture(scope="session")
def faces_dev() -> Path:
    if not (FACES_DEV / "expected.csv").is_file():
        pytest.skip(f"the faces-dev photo set is not at {FACES_DEV}")
    return FACES_DEV


@pytest.fixture(scope="session")
def expected_people(faces_dev) -> dict[str, set[str]]:
    """expected.csv as {image path relative to faces-dev: names}."""
    with open(faces_dev / "expected.csv", newline="") as handle:
        return {row["image"]: {n for n in row["expected_people"].split(";") if n} for row in csv.DictReader(handle)}


@pytest.fixture(scope="session")
def embedder():
    """One set of face models (YuNet and SFace) for the whole session."""
    from worker.faces.embeddings import FaceEmbedder

    return FaceEmbedder()


# -- AWS stand-ins, Redis, Celery workers ----------------------------------------------------------

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


@pytest.fixture(scope="session")
def moto_url():
    """moto's S3 in server mode: a real HTTP endpoint for boto3."""
    from moto.server import ThreadedMotoServer

    from tests.servers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, moto_url):
    """Test credentials and moto's endpoint, through boto3's own environment variables."""
    env = {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": moto_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3(aws_env):
    import boto3

    return boto3.client("s3")


@pytest.fixture
def bucket(s3, request):
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def rekognition(aws_env, moto_url, monkeypatch):
    from tests.rekognition_standin import RekognitionStandIn

    with RekognitionStandIn(s3_endpoint=moto_url) as standin:
        monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", standin.url)
        yield standin


@pytest.fixture
def video_service(rekognition, moto_url, monkeypatch):
    """Rekognition Video's stand-in on the Rekognition stand-in's endpoint (jobs of 0.5 s, each
    finding Ada four times and Grace once), SNS, SQS and IAM at moto's, and jobs looked at often."""
    from tests.rekognition_video_standin import VideoStandIn, detection

    service = VideoStandIn(s3_endpoint=moto_url, job_seconds=0.5)
    service.answer = lambda key, data: [detection(t / 2, "Ada") for t in range(4)] + [detection(3.0, "Grace")]
    rekognition.video = service
    for name in ("SNS", "SQS", "IAM"):
        monkeypatch.setenv(f"AWS_ENDPOINT_URL_{name}", moto_url)
    monkeypatch.setenv("CELEBSCAN_VIDEO_POLL_SECONDS", "0.2")
    monkeypatch.setenv("CELEBSCAN_VIDEO_POLL_MAX_SECONDS", "1")
    yield service
    service.close()


@pytest.fixture(scope="session")
def redis_url():
    from tests.servers import redis_server

    yield from serve(redis_server)


@pytest.fixture
def broker_url(redis_url):
    """The Redis server, flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield redis_url
    client.flushall()
    client.close()


def rekognition_scan_env(aws_env, rekognition, broker_url: str, postgres_url: str, **settings: str) -> dict:
    """The environment of a scan through Redis into PostgreSQL, recognized by the Rekognition stand-in
    in batches of 4 (``settings``: more CELEBSCAN_... variables)."""
    return {
        **aws_env,
        "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url,
        "CELERY_BROKER_URL": broker_url,
        "CELEBSCAN_DATABASE_URL": postgres_url,
        "CELEBSCAN_BACKEND": "rekognition",
        "CELEBSCAN_BATCH_SIZE": "4",
        **settings,
    }


def folder_worker_context(store, recognizer, max_attempts: int = 4):
    """A worker's context that reads local folders and answers with ``recognizer`` (a stub)."""
    from worker.batch import WorkerContext
    from worker.media.images import ImageLimits
    from worker.recognizers import Recognizers
    from worker.sources import FolderReader

    return WorkerContext(
        store=store,
        readers={"folder": FolderReader(10**8)},
        recognizers=Recognizers.of(recognizer),
        limits=ImageLimits(),
        max_attempts=max_attempts,
        retry_base_seconds=0.001,
    )


def write_outcomes(store, outcomes, token: str = "test-run"):
    """Claim the outcomes' images for ``token`` and write them, then finish drained scans: what a
    worker's run does with results it has (tests that start from ready outcomes)."""
    store.images.claim_ids([outcome.image_id for outcome in outcomes], token)
    written = store.images.write(token, outcomes)
    store.finish_scans(written.scan_ids)
    return written


@contextmanager
def lost_acknowledgements(engine, count: int = 1):
    """The next ``count`` commits on ``engine`` happen, and then their acknowledgement is lost: the
    client sees the connection fail (as when the network drops right after COMMIT) and, if it
    retries, replays a transaction that is already in the database."""
    dialect = engine.dialect
    commit = dialect.do_commit
    left = [count]

    def commit_then_lose_the_answer(dbapi_connection):
        commit(dbapi_connection)
        if left[0] > 0:
            left[0] -= 1
            raise dialect.loaded_dbapi.OperationalError("simulated: the connection was lost after COMMIT")

    dialect.do_commit = commit_then_lose_the_answer
    try:
        yield left
    finally:
        del dialect.do_commit


@pytest.fixture
def no_backoff(monkeypatch):
    """Retries without waiting (their waits are tested in test_retry)."""
    import worker.retry

    monkeypatch.setattr(worker.retry, "wait_random_exponential", lambda **kw: lambda state: 0)
