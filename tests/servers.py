"""Real PostgreSQL and Redis servers started from Debian's packages, for tests and benchmarks.

Each server runs in its own temporary directory on a free loopback port and is stopped when the
context manager exits. PostgreSQL refuses to run as root, so under root it runs as the ``postgres``
user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """The server's programs are not installed here."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, *, timeout: float, what: str) -> None:
    """Poll ``ready()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {timeout} s")
        time.sleep(0.05)


def postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise ServerUnavailable(f"{name} not found: apt-get install postgresql")
    return found


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A fresh PostgreSQL cluster; yields its SQLAlchemy URL (user postgres, trust auth, loopback)."""
    initdb, postgres = postgres_binary("initdb"), postgres_binary("postgres")
    run_as = _unprivileged_user()
    directory = Path(tempfile.mkdtemp(prefix="celebscan-pg-"))
    data = directory / "data"
    if run_as:
        shutil.chown(directory, run_as, run_as)
    port = free_port()
    _run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"], run_as)
    process = subprocess.Popen(
        _as_user(run_as, [postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(directory),
                          "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"]),
        stdout=subprocess.DEVNULL, stderr=open(directory / "server.log", "wb"),
    )
    try:
        wait_until(lambda: _accepts(port) or process.poll() is not None, timeout=60, what="PostgreSQL")
        if process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited: {(directory / 'server.log').read_text()[-2000:]}")
        _wait_for_sql(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis server with no persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if not binary:
        raise ServerUnavailable("redis-server not found: apt-get install redis-server")
    directory = Path(tempfile.mkdtemp(prefix="celebscan-redis-"))
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _accepts(port), timeout=30, what="Redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError as exc:
        raise ServerUnavailable("running as root and there is no postgres user to run PostgreSQL as") from exc


def _as_user(user: str | None, command: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *command] if user else command


def _run(command: list[str], user: str | None) -> None:
    subprocess.run(_as_user(user, command), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_sql(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(url)

    def ready() -> bool:
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            return True
        except OperationalError:
            return False

    try:
        wait_until(ready, timeout=30, what="PostgreSQL")
    finally:
        engine.dispose()
