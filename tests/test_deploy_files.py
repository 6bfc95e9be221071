"""docker-compose.yml, Procfile and Flower: valid, and using the real commands."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.servers import free_port, wait_until

PROJECT = Path(__file__).resolve().parent.parent
COMPOSE = (PROJECT / "docker-compose.yml").read_text()


def test_compose_file_is_valid_compose():
    from compose_spec import PyCompose

    compose = PyCompose.from_yaml(COMPOSE)
    assert set(compose.service_names()) == {"redis", "postgres", "worker", "flower", "producer"}


@pytest.mark.skipif(
    not shutil.which("docker") or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode,
    reason="the docker compose plugin is not installed (compose-spec validates the file above)",
)
def test_docker_compose_config_accepts_the_file():
    env = {"POSTGRES_PASSWORD": "x", "FLOWER_BASIC_AUTH": "u:p", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    subprocess.run(
        ["docker", "compose", "-f", str(PROJECT / "docker-compose.yml"), "config", "-q"], env=env, check=True
    )


def test_compose_services_use_the_real_commands_and_keep_secrets_out():
    services = yaml.safe_load(COMPOSE)["services"]
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert "container_name" not in services["worker"], "a fixed name would stop --scale"
    assert services["flower"]["command"][:4] == ["celery", "-A", "worker.celery_app", "flower"]
    assert services["producer"]["entrypoint"] == ["celebscan"]
    for name in ("redis", "postgres", "flower"):
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name
    assert "${POSTGRES_PASSWORD:?" in COMPOSE and "${FLOWER_BASIC_AUTH:?" in COMPOSE


def test_procfile_runs_worker_and_flower():
    entries = dict(line.split(": ", 1) for line in (PROJECT / "Procfile").read_text().splitlines() if line)
    assert entries["worker"].startswith("celery -A worker.celery_app worker")
    assert entries["flower"].startswith("celery -A worker.celery_app flower")


@pytest.mark.slow
def test_flower_requires_the_basic_auth_and_serves_prometheus_metrics(broker_url, tmp_path):
    port = free_port()
    env = {"CELERY_BROKER_URL": broker_url, "FLOWER_BASIC_AUTH": "operator:correct-horse", "PATH": "/usr/bin:/bin"}
    with open(tmp_path / "flower.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
            ],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/"

        def up() -> bool:
            try:
                requests.get(url, timeout=1)
                return True
            except requests.ConnectionError:
                assert process.poll() is None, (tmp_path / "flower.log").read_text()
                return False

        wait_until(up, timeout=60, what="Flower")
        assert requests.get(url, timeout=5).status_code == 401
        assert requests.get(url, auth=("operator", "wrong"), timeout=5).status_code == 401
        assert requests.get(url, auth=("operator", "correct-horse"), timeout=5).status_code == 200
        # Flower serves Prometheus' /metrics without authentication, by its design (for scrapers):
        # it holds counts and timings only, and Flower listens on 127.0.0.1 in every setup we ship.
        metrics = requests.get(url + "metrics", timeout=5)
        assert metrics.status_code == 200 and "flower_events_total" in metrics.text
    finally:
        process.terminate()
        process.wait(timeout=30)
