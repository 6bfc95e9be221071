"""The user's paths, run through the user's own files: README's distributed section and the Procfile.

Workers get nothing but what README exports (the broker, the database URL as users write it, the
region) plus AWS credentials and the stand-ins' endpoints (boto3's own variables: on AWS an
instance role and the real endpoints take their place). No celebscan setting is added.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import PROJECT, _reset_postgres
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from tests.servers import wait_until
from worker.store import ResultStore

pytestmark = pytest.mark.slow

README = (PROJECT / "README.md").read_text()
PROCFILE = dict(line.split(": ", 1) for line in (PROJECT / "Procfile").read_text().splitlines() if line)
WORKER_FILES = [
    "Procfile",
    "docker-compose.yml",
    "Dockerfile",
    "deploy/systemd/celebscan-worker.service",
    "deploy/aws/celebscan.yaml",
]


def distributed_block() -> list[str]:
    """The command lines of README's "Distributed" code block, comments removed."""
    section = README.split("## Distributed", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split(" #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def readme_line(starting: str) -> str:
    [line] = [line for line in distributed_block() if line.startswith(starting)]
    return line


def readme_exports() -> dict[str, str]:
    return dict(line[len("export ") :].split("=", 1) for line in distributed_block() if line.startswith("export "))


def user_env(home: Path, broker_url: str, postgres_url: str, aws_env: dict, rekognition_url: str) -> dict[str, str]:
    """A fresh shell's environment plus README's exports, with this machine's services as their values."""
    exported = readme_exports()
    assert set(exported) == {"CELERY_BROKER_URL", "CELEBSCAN_DATABASE_URL", "AWS_DEFAULT_REGION"}
    assert exported["CELEBSCAN_DATABASE_URL"].startswith("postgresql://"), "the form psql, RDS and guides use"
    database_url = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "CELERY_BROKER_URL": broker_url,
        "CELEBSCAN_DATABASE_URL": database_url,
        "AWS_DEFAULT_REGION": exported["AWS_DEFAULT_REGION"],
        # credentials and endpoints: an instance role and AWS itself in production
        **{
            name: aws_env[name]
            for name in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_ENDPOINT_URL_S3",
            )
        },
        "AWS_ENDPOINT_URL_REKOGNITION": rekognition_url,
    }


@contextlib.contextmanager
def shell_command(command: str, env: dict[str, str], cwd: Path, log: Path):
    """``command`` run by bash as a user types it; stopped warm (SIGTERM) at exit."""
    with open(log, "wb") as output:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def run_as_user(command: str, env: dict[str, str], cwd: Path) -> str:
    finished = subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "Traceback" not in finished.stderr, finished.stderr
    return finished.stdout


def test_worker_files_start_workers_the_same_plain_way():
    for name in WORKER_FILES:
        text = (PROJECT / name).read_text()
        assert "CELEBSCAN_BACKEND" not in text, f"{name} must not need a backend setting"
        assert "--queues" not in text and " -Q " not in text, f"{name} must consume what a plain worker does"
    assert readme_line("celery -A worker.celery_app worker").startswith(
        "celery -A worker.celery_app worker --concurrency"
    )
    assert PROCFILE["worker"].startswith("celery -A worker.celery_app worker --concurrency")


def test_workers_started_as_readme_says_serve_readmes_rekognition_scan(
    aws_env, rekognition, broker_url, postgres_url, s3, bucket, tmp_path
):
    _reset_postgres(postgres_url)
    for number in range(24):
        s3.put_object(Bucket=bucket, Key=f"photos/{number:02d}.jpg", Body=jpeg(300 + number, 200))
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
    env = user_env(tmp_path, broker_url, postgres_url, aws_env, rekognition.url)
    scan_command = readme_line("celebscan scan s3://my-bucket/photos/").replace("my-bucket", bucket)
    assert scan_command.endswith("--backend rekognition")

    with shell_command(readme_line("celery -A worker.celery_app worker"), env, tmp_path, tmp_path / "worker.log"):
        output = run_as_user(scan_command, env, tmp_path)
        assert "listed 24 images" in output, output
        store = ResultStore.connect(postgres_url)
        scan_id = store.latest_scan_id()
        wait_until(
            lambda: store.scan_summary(scan_id).finished_at is not None, timeout=180, what="README's scan to finish"
        )
    summary = store.scan_summary(scan_id)
    assert summary.counts == {"queued": 0, "done": 24, "failed": 0}, (tmp_path / "worker.log").read_text()[-3000:]
    assert summary.listed == 24
    assert summary.people == {"someone": 24}
    status = run_as_user(f"celebscan status {scan_id}", env, tmp_path)
    assert "24 done, 0 failed" in status
    store.engine.dispose()


def test_one_procfile_worker_serves_a_local_and_a_rekognition_scan_at_once(
    aws_env, rekognition, broker_url, postgres_url, s3, bucket, faces_dev, expected_people, tmp_path
):
    _reset_postgres(postgres_url)
    local_images = ["test/obama1.jpg", "test/obama_and_biden.jpg", "extra/lin-manuel-miranda.png"]
    for image in local_images:
        s3.put_object(Bucket=bucket, Key=f"family/{image}", Body=(faces_dev / image).read_bytes())
    for number in range(16):
        s3.put_object(Bucket=bucket, Key=f"press/{number:02d}.jpg", Body=jpeg(300 + number, 200))
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
    env = user_env(tmp_path, broker_url, postgres_url, aws_env, rekognition.url)
    run_as_user(f"celebscan gallery import {shlex.quote(str(faces_dev / 'train'))}", env, tmp_path)

    local_scan = run_as_user(f"celebscan scan s3://{bucket}/family/", env, tmp_path)
    paid_scan = run_as_user(f"celebscan scan s3://{bucket}/press/ --backend rekognition", env, tmp_path)
    assert "backend local" in local_scan and "backend rekognition" in paid_scan
    store = ResultStore.connect(postgres_url)
    paid_id = store.latest_scan_id()
    local_id = paid_id - 1
    worker = PROCFILE["worker"]
    assert "CELEBSCAN_WORKER_CONCURRENCY:-2" in worker  # unset here: the Procfile's two processes
    with shell_command(worker, env, tmp_path, tmp_path / "worker.log") as node:
        wait_until(
            lambda: all(store.scan_summary(i).finished_at for i in (local_id, paid_id)),
            timeout=300,
            what="both scans to finish",
        )
        processes = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
    assert len(processes) == 2
    paid = store.scan_summary(paid_id)
    assert paid.counts == {"queued": 0, "done": 16, "failed": 0} and paid.people == {"someone": 16}
    local = {r.key: r for r in store.result_records(local_id)}
    assert {key: r.status for key, r in local.items()} == {f"family/{image}": "done" for image in local_images}
    for image in local_images:
        names = sorted(c.name for c in local[f"family/{image}"].celebrities)
        assert names == sorted(expected_people[image]), image
    assert len(rekognition.calls) == 16, "the local scan's images never reach the paid service"
    store.engine.dispose()


def test_a_scan_no_worker_can_serve_waits_and_says_why(aws_env, broker_url, postgres_url, s3, bucket, tmp_path):
    """A worker without the local extra hands a local scan's batches back; status names the fix."""
    _reset_postgres(postgres_url)
    for number in range(6):
        s3.put_object(Bucket=bucket, Key=f"photos/{number}.jpg", Body=jpeg())
    env = user_env(tmp_path, broker_url, postgres_url, aws_env, "http://127.0.0.1:9")
    run_as_user(f"celebscan scan s3://{bucket}/photos/", env, tmp_path)
    store = ResultStore.connect(postgres_url)
    scan_id = store.latest_scan_id()
    hidden = tmp_path / "without-local"
    hidden.mkdir()
    (hidden / "cv2.py").write_text("raise ModuleNotFoundError(\"No module named 'cv2'\", name='cv2')\n")
    worker_env = {**env, "PYTHONPATH": str(hidden)}  # this machine lacks the local extra
    with shell_command(readme_line("celery -A worker.celery_app worker"), worker_env, tmp_path, tmp_path / "w.log"):
        wait_until(
            lambda: store.scan_summary(scan_id).unserved is not None,
            timeout=120,
            what="the worker to hand the batch back",
        )
    summary = store.scan_summary(scan_id)
    assert summary.counts == {"queued": 6, "done": 0, "failed": 0}, "no image fails for the worker it reached"
    status = run_as_user(f"celebscan status {scan_id}", env, tmp_path)
    [line] = [line for line in status.splitlines() if "waiting:" in line]
    assert "cannot run the local recognizer" in line and "pip install '.[local]'" in line
    metrics = run_as_user("celebscan metrics", env, tmp_path)
    assert f"scan {scan_id} is waiting: no worker has served its batches" in metrics
    store.engine.dispose()
