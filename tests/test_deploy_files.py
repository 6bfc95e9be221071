"""docker-compose.yml, Procfile and Flower: valid, and using the real commands."""

import os
import re
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
    assert set(compose.service_names()) == {"redis", "postgres", "worker", "flower", "events", "producer"}


@pytest.mark.skipif(
    not shutil.which("docker") or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode,
    reason="the docker compose plugin is not installed (compose-spec validates the file above)",
)
def test_docker_compose_config_accepts_the_file():
    env = {"POSTGRES_PASSWORD": "x", "FLOWER_BASIC_AUTH": "u:p", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    compose = ["docker", "compose", "-f", str(PROJECT / "docker-compose.yml")]
    subprocess.run([*compose, "config", "-q"], env=env, check=True)

    def services(*profile: str) -> set[str]:
        listed = subprocess.run([*compose, *profile, "config", "--services"], env=env, check=True, capture_output=True)
        return set(listed.stdout.decode().split())

    assert "events" not in services(), "`docker compose up` starts no follower"
    assert "events" in services("--profile", "follow")


def test_compose_services_use_the_real_commands_and_keep_secrets_out():
    services = yaml.safe_load(COMPOSE)["services"]
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert "container_name" not in services["worker"], "a fixed name would stop --scale"
    assert services["flower"]["command"][:4] == ["celery", "-A", "worker.celery_app", "flower"]
    assert services["producer"]["entrypoint"] == ["celebscan"]
    assert services["events"]["command"] == ["celebscan", "follow"]
    for name in ("redis", "postgres", "flower"):
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name
    assert "${POSTGRES_PASSWORD:?" in COMPOSE and "${FLOWER_BASIC_AUTH:?" in COMPOSE


def test_the_events_service_follows_only_when_asked():
    """Started with --profile follow only (a user who follows nothing never sees it fail), with the
    worker's environment (the source and queue among it), a stop that outlasts a 20 s long poll."""
    services = yaml.safe_load(COMPOSE)["services"]
    events = services["events"]
    assert events["profiles"] == ["follow"]
    assert events["environment"] is services["worker"]["environment"], "the same anchor as the worker"
    assert {"CELEBSCAN_FOLLOW_SOURCE", "CELEBSCAN_EVENTS_QUEUE_URL"} <= set(events["environment"])
    assert events["restart"] == "unless-stopped" and "container_name" not in events
    assert events["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    value, unit = re.fullmatch(r"(\d+)(s|m)", events["stop_grace_period"]).groups()
    assert int(value) * {"s": 1, "m": 60}[unit] >= 30


def procfile() -> dict[str, str]:
    return dict(line.split(": ", 1) for line in (PROJECT / "Procfile").read_text().splitlines() if line)


def test_procfile_runs_worker_flower_and_events():
    entries = procfile()
    assert entries["worker"].startswith("celery -A worker.celery_app worker")
    assert entries["flower"].startswith("celery -A worker.celery_app flower")
    assert entries["events"] == "celebscan follow"


def test_the_events_line_reads_its_source_and_queue_from_the_environment(tmp_path):
    """`celebscan follow` with no argument asks for what the environment lacks, by its setting's name."""
    from click.testing import CliRunner

    from producer.cli import cli

    args = procfile()["events"].split()[1:]
    env = {"CELEBSCAN_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}", "CELERY_BROKER_URL": ""}
    env |= {"CELEBSCAN_FOLLOW_SOURCE": "", "CELEBSCAN_EVENTS_QUEUE_URL": ""}
    missing = CliRunner().invoke(cli, args, env=env)
    assert missing.exit_code == 2 and "CELEBSCAN_FOLLOW_SOURCE" in missing.output
    no_queue = CliRunner().invoke(cli, args, env={**env, "CELEBSCAN_FOLLOW_SOURCE": "s3://b/p/"})
    assert no_queue.exit_code == 2 and "CELEBSCAN_EVENTS_QUEUE_URL" in no_queue.output


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
