"""Real Celery worker processes (``celery -A worker.celery_app worker``) started by tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.servers import wait_until
from worker.store import ResultStore


@contextlib.contextmanager
def celery_workers(
    count: int,
    env: dict[str, str],
    logs: Path,
    concurrency: int = 1,
    *,
    host=None,
    name: str = "worker",
    app: str = "worker.celery_app",
) -> Iterator[list[subprocess.Popen]]:
    """``count`` worker nodes of ``app``, each with ``concurrency`` prefork processes, each in a
    session of its own (a test may kill a whole node); stopped warm at exit.

    With ``host`` (a :class:`tests.netns.Host`) they run inside that host's network namespace.
    """
    processes = []
    with contextlib.ExitStack() as log_files:
        try:
            for number in range(count):
                log = log_files.enter_context(open(logs / f"{name}{number}.log", "wb"))
                command = [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    app,
                    "worker",
                    "-n",
                    f"{name}{number}@%h",
                    "--concurrency",
                    str(concurrency),
                    "--pool",
                    "prefork",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel",
                    "INFO",
                ]
                processes.append(
                    subprocess.Popen(
                        host.command(command) if host else command,
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            yield processes
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()


def pool_children(process: subprocess.Popen) -> list[int]:
    """The pids of a worker node's pool processes (Linux: /proc/PID/task/PID/children)."""
    path = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def pid_with_port(port: int, candidates: list[int]) -> int | None:
    """Which of ``candidates`` owns the loopback TCP socket whose local port is ``port`` (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    for pid in candidates:
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            return pid
    return None


def wait_for_scan(store: ResultStore, scan_id: int, timeout: float = 300) -> None:
    wait_until(
        lambda: store.scan_summary(scan_id).finished_at is not None, timeout=timeout, what=f"scan {scan_id} to finish"
    )
