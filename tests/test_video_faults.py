"""Videos through faults, with both backends, with Celery workers started as the Procfile says and
embedded: a worker SIGKILLed between a job's start and its record (Celery redelivers its message),
a completion message lost, completion messages delivered twice, a worker or the scan command killed
in the middle of a local video. Every video ends done or failed with a code; none is started twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from sqlalchemy import select

from producer.video_notifications import set_up
from tests.celery_workers import celery_workers, pid_with_port, pool_children, wait_for_scan
from tests.clirun import celebscan
from tests.imagemaker import jpeg
from tests.servers import wait_until
from tests.videomaker import clip, colour, mp4_header
from worker.schema import video_jobs
from worker.settings import Settings
from worker.store import ResultStore

pytestmark = pytest.mark.slow

#: As tests/test_faults.py: a killed worker's claims come free within seconds.
CELERY = {
    "CELEBSCAN_BATCH_SIZE": "4",
    "CELEBSCAN_VISIBILITY_TIMEOUT": "5",
    "CELEBSCAN_LEASE_SECONDS": "4",
    "CELEBSCAN_MAX_ATTEMPTS": "10",
    "CELEBSCAN_CALLS_IN_FLIGHT": "8",
}


@pytest.fixture
def pg_env(aws_env, broker_url, postgres_url, rekognition, moto_url):
    from tests.conftest import _reset_postgres

    _reset_postgres(postgres_url)
    env = {
        **aws_env,
        **{f"AWS_ENDPOINT_URL_{name}": moto_url for name in ("SNS", "SQS", "IAM")},
        "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url,
        "CELERY_BROKER_URL": broker_url,
        "CELEBSCAN_DATABASE_URL": postgres_url,
        "CELEBSCAN_VIDEO_POLL_SECONDS": "0.3",
        "CELEBSCAN_VIDEO_POLL_MAX_SECONDS": "2",
        **CELERY,
    }
    yield env
    _reset_postgres(postgres_url)


def scan(env: dict, source: str, backend: str = "rekognition") -> int:
    celebscan("scan", source, "--backend", backend, env=env)
    return ResultStore.connect(env["CELEBSCAN_DATABASE_URL"]).latest_scan_id()


def codes(store: ResultStore, scan_id: int) -> dict[str, str | None]:
    return {r.key: (r.error.code if r.error else r.status) for r in store.result_records(scan_id)}


def started_once(service, keys) -> None:
    twice = {key: service.jobs_started(key) for key in keys if service.jobs_started(key) != 1}
    assert not twice, f"started more than once (or never): {twice}"


def test_a_worker_killed_between_a_start_and_its_record(video_service, pg_env, s3, bucket, rekognition, tmp_path):
    """The worker process that starts m/v2.mp4's job dies before the JobId comes back: its message
    is redelivered, its claim runs out, and the next run starts the job again with the same token:
    the same JobId, no second job. The mixed bucket's other videos, pictures, a broken video and one
    over the limits all end as they should."""
    videos = [f"m/v{number}.mp4" for number in range(6)]
    for number, key in enumerate(videos):
        s3.put_object(Bucket=bucket, Key=key, Body=mp4_header(2 + number / 100, media_bytes=number))
    s3.put_object(Bucket=bucket, Key="m/broken.mp4", Body=mp4_header(2)[:60])
    s3.put_object(Bucket=bucket, Key="m/seven hours.mp4", Body=mp4_header(7 * 3600))
    for number in range(2):
        s3.put_object(Bucket=bucket, Key=f"m/photo{number}.jpg", Body=jpeg(200 + number, 160))
    nodes: list = []
    killed = threading.Event()

    def kill_the_caller(job, new):
        if job.key == "m/v2.mp4" and new and not killed.is_set():
            children = [pid for node in nodes for pid in pool_children(node)]
            caller = pid_with_port(rekognition.request.client_port, children)
            assert caller is not None, "the stand-in could not find the calling worker process"
            killed.set()
            os.kill(caller, signal.SIGKILL)

    video_service.on_start = kill_the_caller
    scan_id = scan(pg_env, f"s3://{bucket}/m/")
    store = ResultStore.connect(pg_env["CELEBSCAN_DATABASE_URL"])
    with celery_workers(2, pg_env, tmp_path) as started:
        nodes.extend(started)
        wait_for_scan(store, scan_id, timeout=300)
    assert killed.is_set()
    found = codes(store, scan_id)
    assert found == {
        **dict.fromkeys(videos, "done"),
        "m/broken.mp4": "CorruptVideo",
        "m/seven hours.mp4": "VideoTooLong",
        "m/photo0.jpg": "done",
        "m/photo1.jpg": "done",
    }
    started_once(video_service, videos)
    victim = [start for start in video_service.starts if start.key == "m/v2.mp4"]
    assert len(victim) >= 2 and len({start.token for start in victim}) == 1 and len({s.job_id for s in victim}) == 1
    assert all(r.appearances for r in store.result_records(scan_id) if r.key in videos)


def test_completion_messages_lost_and_delivered_twice(video_service, pg_env, s3, bucket, tmp_path):
    """Completions through SNS → SQS, each delivered twice, and one lost: the lost one's video ends
    at its fallback look, the doubled ones change nothing."""
    made = set_up(Settings.from_env(pg_env), "fault-video-jobs")
    env = {
        **pg_env,
        "CELEBSCAN_VIDEO_SNS_TOPIC_ARN": made.topic_arn,
        "CELEBSCAN_VIDEO_SNS_ROLE_ARN": made.role_arn,
        "CELEBSCAN_VIDEO_COMPLETIONS_QUEUE_URL": made.queue_url,
        "CELEBSCAN_VIDEO_POLL_MAX_SECONDS": "5",
    }
    videos = [f"n/v{number}.mp4" for number in range(5)]
    for number, key in enumerate(videos):
        s3.put_object(Bucket=bucket, Key=key, Body=mp4_header(2 + number / 100, media_bytes=number))
    video_service.repeat_completions = True
    video_service.lose_completion = lambda key: key == "n/v3.mp4"
    scan_id = scan(env, f"s3://{bucket}/n/")
    store = ResultStore.connect(env["CELEBSCAN_DATABASE_URL"])
    with celery_workers(1, env, tmp_path, concurrency=2):
        wait_for_scan(store, scan_id, timeout=300)
    assert codes(store, scan_id) == dict.fromkeys(videos, "done")
    started_once(video_service, videos)
    assert [job.published for job in sorted(video_service.jobs.values(), key=lambda j: j.key)] == [
        True,
        True,
        True,
        False,
        True,
    ]


@pytest.fixture(scope="module")
def stories(faces_dev) -> dict[str, bytes]:
    """The same scenes in two containers (two videos: other bytes)."""
    test = faces_dev / "test"
    scenes = [(test / "obama1.jpg", 3.0), (colour((30, 30, 200)), 1.0), (test / "kit_with_rose.jpg", 3.0)]
    return {f"story.{kind}": clip(scenes, kind=kind, size=(480, 360)) for kind in ("mp4", "mov")}


def local_videos(folder, stories: dict[str, bytes], faces_dev) -> list[str]:
    """The videos (their keys returned), a picture and a broken video: a mixed folder."""
    folder.mkdir()
    for key, data in stories.items():
        (folder / key).write_bytes(data)
    (folder / "obama1.jpg").write_bytes((faces_dev / "test" / "obama1.jpg").read_bytes())
    (folder / "broken.mp4").write_bytes(stories["story.mp4"][:5000])
    return sorted(stories)


def check_local(store: ResultStore, scan_id: int, keys: list[str]) -> None:
    records = {r.key: r for r in store.result_records(scan_id)}
    assert {key: records[key].status for key in keys} == dict.fromkeys(keys, "done")
    assert records["broken.mp4"].error.code == "CorruptVideo" and records["obama1.jpg"].names == ["obama"]
    for key in keys:
        assert {a.name for a in records[key].appearances} >= {"obama", "kit_harington"}, key
    with store.engine.connect() as conn:
        jobs = conn.execute(select(video_jobs.c.key, video_jobs.c.generation, video_jobs.c.status)).all()
    assert sorted(jobs) == [(key, 0, "succeeded") for key in sorted(keys)], "each video's frames worked by one job"


def test_a_local_worker_killed_mid_video(faces_dev, stories, pg_env, tmp_path):
    """Celery workers recognize two videos slice by slice; both pool processes are killed once a
    slice is saved: the videos go on from the saved position and end done, each in one job."""
    keys = local_videos(tmp_path / "videos", stories, faces_dev)
    env = {**pg_env, "CELEBSCAN_VIDEO_FRAMES_PER_SECOND": "4", "CELEBSCAN_VIDEO_SLICE_SECONDS": "0.2"}
    celebscan("gallery", "import", faces_dev / "train", env=env)
    scan_id = scan(env, str(tmp_path / "videos"), backend="local")
    store = ResultStore.connect(env["CELEBSCAN_DATABASE_URL"])
    with celery_workers(1, env, tmp_path, concurrency=2) as nodes:
        wait_until(lambda: _saved(store), timeout=120, what="a slice saved")
        for pid in pool_children(nodes[0]):
            os.kill(pid, signal.SIGKILL)
        wait_for_scan(store, scan_id, timeout=300)
    check_local(store, scan_id, keys)


def _saved(store: ResultStore) -> bool:
    with store.engine.connect() as conn:
        return bool(conn.execute(select(video_jobs.c.id).where(video_jobs.c.position_ms > 0)).first())


def embedded(env: dict, *args: str) -> subprocess.Popen:
    """``celebscan ARGS`` without a broker, in a process of its own (one the test may kill)."""
    without_broker = {key: value for key, value in {**os.environ, **env}.items() if key != "CELERY_BROKER_URL"}
    command = [sys.executable, "-m", "producer.cli", *args]
    return subprocess.Popen(command, env=without_broker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_embedded_scan_killed_between_a_start_and_its_record(video_service, pg_env, s3, bucket):
    """An embedded scan (one process) dies as its first job starts; `scan --resume` finishes the
    scan: the job is found again by its token, none started twice."""
    videos = [f"e/v{number}.mp4" for number in range(3)]
    for number, key in enumerate(videos):
        s3.put_object(Bucket=bucket, Key=key, Body=mp4_header(2 + number / 100, media_bytes=number))
    process: list[subprocess.Popen] = []
    killed = threading.Event()

    def kill_the_scan(job, new):
        if new and not killed.is_set():
            killed.set()
            process[0].kill()

    video_service.on_start = kill_the_scan
    process.append(embedded(pg_env, "scan", f"s3://{bucket}/e/", "--backend", "rekognition", "--workers", "1"))
    process[0].wait(timeout=120)
    assert killed.is_set()
    store = ResultStore.connect(pg_env["CELEBSCAN_DATABASE_URL"])
    scan_id = store.latest_scan_id()
    assert store.summary(scan_id).finished_at is None
    env = {key: value for key, value in pg_env.items() if key != "CELERY_BROKER_URL"}
    resume = embedded(env, "scan", "--resume", str(scan_id), "--workers", "1")
    assert resume.wait(timeout=120) == 0
    assert codes(store, scan_id) == dict.fromkeys(videos, "done")
    started_once(video_service, videos)
    assert any(not start.new for start in video_service.starts), "the start was repeated and found the same job"


def test_embedded_local_scan_killed_mid_video(faces_dev, stories, pg_env, tmp_path):
    """An embedded local scan killed once a slice is saved; `scan --resume` goes on from there."""
    keys = local_videos(tmp_path / "videos", stories, faces_dev)
    env = {**pg_env, "CELEBSCAN_VIDEO_FRAMES_PER_SECOND": "4", "CELEBSCAN_VIDEO_SLICE_SECONDS": "0.2"}
    celebscan("gallery", "import", faces_dev / "train", env=env)
    process = embedded(env, "scan", str(tmp_path / "videos"), "--backend", "local", "--workers", "1")
    store = ResultStore.connect(env["CELEBSCAN_DATABASE_URL"])
    wait_until(lambda: _saved(store), timeout=120, what="a slice saved")
    process.kill()
    process.wait()
    scan_id = store.latest_scan_id()
    resume = embedded(env, "scan", "--resume", str(scan_id), "--workers", "1")
    assert resume.wait(timeout=300) == 0
    check_local(store, scan_id, keys)
