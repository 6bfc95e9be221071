"""End to end through real parts: moto's S3 over HTTP, the Rekognition stand-in, a real Redis broker,
real Celery worker processes and a real PostgreSQL server."""

import threading

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import func, select

from producer.cli import cli
from tests.celery_workers import celery_workers, wait_for_scan
from tests.clirun import celebscan
from tests.conftest import rekognition_scan_env
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from worker.celery_config import QUEUE
from worker.schema import faces, images
from worker.store import ResultStore

pytestmark = pytest.mark.slow


@pytest.fixture
def photo_bucket(s3, bucket, faces_dev, expected_people):
    """faces-dev's test/ and extra/ photos plus bad files, under ``2024/``; returns key -> names."""
    answers = {}
    for image, people in expected_people.items():
        key = f"2024/{image}"
        s3.put_object(Bucket=bucket, Key=key, Body=(faces_dev / image).read_bytes())
        answers[key] = sorted(people)
    copy_key = "2024/ünïcode dir/obama + friends %20.jpg"
    s3.put_object(Bucket=bucket, Key=copy_key, Body=(faces_dev / "test" / "obama1.jpg").read_bytes())
    answers[copy_key] = ["obama"]
    bad = {
        "2024/bad/notes.jpg": b"just notes",
        "2024/bad/empty.png": b"",
        "2024/bad/tiny.jpg": jpeg(40, 40),
        "2024/bad/page.png": b"<!DOCTYPE html><html>403</html>",
    }
    for key, body in bad.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3.put_object(Bucket=bucket, Key="2024/readme.txt", Body=b"not listed")
    return answers, set(bad)


def scan(env, *args) -> str:
    return celebscan("scan", *args, env=env).output


def answer_by_key(answers):
    def answer(key, data):
        names = answers.get(key, [])
        return {
            "CelebrityFaces": [celebrity(n, left=0.1 + 0.4 * i) for i, n in enumerate(names)],
            "UnrecognizedFaces": [],
        }

    return answer


def test_bucket_scan_through_redis_and_two_workers(
    aws_env, rekognition, broker_url, postgres_url, pg_store, bucket, photo_bucket, tmp_path
):
    answers, bad_keys = photo_bucket
    rekognition.answer = answer_by_key(answers)
    env = rekognition_scan_env(aws_env, rekognition, broker_url, postgres_url)

    output = scan(env, f"s3://{bucket}/2024/")
    listed = len(answers) + len(bad_keys)
    assert f"listed {listed} images; 0 already done, {listed} to scan" in output, "a page's worth is listed by scan"
    assert "handing out batches through redis://" in output and "(at most 256 at a time)" in output
    scan_id = pg_store.latest_scan_id()

    watch = []
    watcher = threading.Thread(
        target=lambda: watch.append(
            CliRunner().invoke(cli, ["status", str(scan_id), "--watch", "--interval", "0.2"], env=env)
        ),
        daemon=True,
    )
    with celery_workers(2, env, tmp_path):
        watcher.start()
        wait_for_scan(pg_store, scan_id)
    watcher.join(timeout=30)
    [watched] = watch
    assert watched.exit_code == 0 and f"scan {scan_id} (finished)" in watched.output
    assert f"{len(answers)} done, {len(bad_keys)} failed" in watched.output
    assert "failed: EmptyObject 1, ImageTooSmall 1, InvalidImageFormat 2" in watched.output  # the live bar

    records = {r.key: r for r in pg_store.result_records(scan_id)}
    assert set(records) == set(answers) | bad_keys
    assert pg_store.summary(scan_id).listed == listed and pg_store.summary(scan_id).listing == "listed"
    with pg_store.engine.connect() as conn:
        per_key = conn.execute(select(images.c.key, func.count()).group_by(images.c.key)).all()
    assert all(n == 1 for _, n in per_key) and len(per_key) == listed
    for key, names in answers.items():
        assert records[key].status == "done"
        assert sorted(c.name for c in records[key].celebrities) == names, key
    codes = {key: records[key].error.code for key in bad_keys}
    assert codes == {
        "2024/bad/notes.jpg": "InvalidImageFormat",
        "2024/bad/empty.png": "EmptyObject",
        "2024/bad/tiny.jpg": "ImageTooSmall",
        "2024/bad/page.png": "InvalidImageFormat",
    }
    reused = pg_store.summary(scan_id).reused  # the copy of obama1.jpg, unless both were in flight at once
    assert reused in (0, 1) and len(rekognition.calls) + reused == len(answers), "bad images are never paid for"
    assert {c.kind for c in rekognition.calls} == {"S3Object"}
    with pg_store.engine.connect() as conn:
        details = conn.execute(select(faces.c.details, faces.c.known_gender, faces.c.landmarks)).first()
    assert details.details["Face"]["Pose"] and details.known_gender == "Male" and len(details.landmarks) == 2
    assert "Landmarks" not in details.details["Face"] and "Name" not in details.details  # stored once

    summary = pg_store.scan_summary(scan_id)
    print(f"\n{listed} images through Redis, 2 workers: {summary.rate:.1f} images/s")

    calls_before = len(rekognition.calls)
    again = scan(env, f"s3://{bucket}/2024/")
    assert f"{len(answers)} already done, {len(bad_keys)} to scan" in again
    again_id = pg_store.latest_scan_id()
    assert pg_store.summary(again_id).counts["queued"] == len(bad_keys)  # only the failed images go out again
    assert redis.Redis.from_url(broker_url).llen(QUEUE) <= 2 * 256  # the new window, and slots the first one left
    assert len(rekognition.calls) == calls_before


def test_every_image_ends_done_while_the_service_throttles_half_the_calls(
    aws_env, rekognition, broker_url, postgres_url, pg_store, s3, bucket, tmp_path
):
    for i in range(24):
        s3.put_object(Bucket=bucket, Key=f"t/{i:02d}.jpg", Body=jpeg(200 + i, 150))
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
    rekognition.throttle_every = 2
    env = rekognition_scan_env(aws_env, rekognition, broker_url, postgres_url, CELEBSCAN_MAX_ATTEMPTS="10")
    scan(env, f"s3://{bucket}/t/")
    scan_id = pg_store.latest_scan_id()
    with celery_workers(2, env, tmp_path):
        wait_for_scan(pg_store, scan_id)
    summary = pg_store.scan_summary(scan_id)
    assert summary.counts == {"queued": 0, "done": 24, "failed": 0}
    throttled = sum(c.answered == "ThrottlingException" for c in rekognition.calls)
    assert throttled >= 20 and len(rekognition.calls) == 24 + throttled


def test_unreachable_broker_is_a_clean_error_and_creates_no_scan(aws_env, sqlite_url, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg())
    env = {"CELERY_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0", "CELEBSCAN_DATABASE_URL": sqlite_url}
    result = CliRunner().invoke(cli, ["scan", str(folder)], env=env)
    assert result.exit_code == 1 and "cannot reach the broker" in result.output
    assert "hunter2" not in result.output
    assert ResultStore.connect(sqlite_url).latest_scan_id() is None


def test_missing_bucket_is_a_clean_error(aws_env, sqlite_url):
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "scan", "s3://no-such-bucket-x/"])
    assert result.exit_code == 1 and "NoSuchBucket" in result.output


def test_workers_refuse_pickled_messages(broker_url, postgres_url, pg_store, tmp_path):
    from kombu import Connection, Exchange, Producer, Queue

    from worker.celery_config import TASK_NAME
    from worker.listing import ListedObject

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("first.jpg", "second.jpg"):
        (folder / name).write_bytes(jpeg())
    scan_id = pg_store.create_scan(str(folder), "local")
    listed = [ListedObject(name, name, 1) for name in ("first.jpg", "second.jpg")]
    first, second = pg_store.queue_images(scan_id, str(folder), "local", listed).image_ids

    with Connection(broker_url) as connection:
        exchange = Exchange(QUEUE, type="direct")
        producer = Producer(connection, exchange=exchange, routing_key=QUEUE)
        headers = {"task": TASK_NAME, "id": "pickled-1", "lang": "py"}
        producer.publish(
            (([first],), {}, {}),
            serializer="pickle",
            headers=headers,
            declare=[Queue(QUEUE, exchange, routing_key=QUEUE)],
        )
    from worker.celery_config import make_celery
    from worker.settings import Settings

    make_celery(Settings(broker_url=broker_url)).send_task(TASK_NAME, args=[[second]])

    env = {"CELERY_BROKER_URL": broker_url, "CELEBSCAN_DATABASE_URL": postgres_url, "CELEBSCAN_BACKEND": "local"}
    with celery_workers(1, env, tmp_path):
        from tests.servers import wait_until

        wait_until(lambda: not pg_store.images.queued([second]), timeout=120, what="the JSON batch")
    assert [i.id for i in pg_store.images.queued([first, second])] == [first]
    assert "untrusted content of type pickle" in (tmp_path / "worker0.log").read_text()


def test_unreachable_endpoint_is_a_clean_error_and_creates_no_scan(aws_env, sqlite_url):
    result = CliRunner().invoke(
        cli, ["--database-url", sqlite_url, "--endpoint-url", "http://127.0.0.1:1", "scan", "s3://photos/2024/"]
    )
    assert result.exit_code == 1 and "Could not connect" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert ResultStore.connect(sqlite_url).latest_scan_id() is None
