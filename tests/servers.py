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


class ServerProcess:
    """A server on a fixed port that a test can stop and start again (same data).

    It listens on loopback, or on ``host`` (the services host's address in a multi-host test).
    """

    name = "server"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix=f"celebscan-{self.name}-"))
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.directory / "server.log", "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log)
        wait_until(
            lambda: _accepts(self.host, self.port) or self.process.poll() is not None, timeout=60, what=self.name
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {(self.directory / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), as a service manager does."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class PostgresServer(ServerProcess):
    """A fresh PostgreSQL cluster (user postgres, trust auth); run as ``postgres`` under root.

    ``trusted_network`` (a CIDR) is let in too, for clients on other (namespaced) hosts. Tests run
    it without flushing to disk (faster); ``durable`` keeps PostgreSQL's defaults (fsync, full page
    writes), as a production server runs, for benchmarks.
    """

    name = "postgres"

    def __init__(self, host: str = "127.0.0.1", trusted_network: str | None = None, durable: bool = False) -> None:
        self.durable = durable
        initdb, self.binary = postgres_binary("initdb"), postgres_binary("postgres")
        self.run_as = _unprivileged_user()
        super().__init__(host)
        if self.run_as:
            shutil.chown(self.directory, self.run_as, self.run_as)
        data = self.directory / "data"
        _run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"], self.run_as)
        if trusted_network:
            with open(data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {trusted_network} trust\n")
        self.url = f"postgresql+psycopg2://postgres@{host}:{self.port}/postgres"

    def command(self) -> list[str]:
        return _as_user(
            self.run_as,
            [
                self.binary,
                "-D",
                str(self.directory / "data"),
                "-p",
                str(self.port),
                "-h",
                self.host,
                "-k",
                str(self.directory),
                "-c",
                "max_connections=200",
                *([] if self.durable else ["-c", "fsync=off", "-c", "full_page_writes=off"]),
            ],
        )

    def start(self) -> None:
        super().start()
        _wait_for_sql(self.url)


class RedisServer(ServerProcess):
    """Redis; with ``appendonly`` its data survives a restart, as in production."""

    name = "redis"

    def __init__(self, appendonly: bool = False, host: str = "127.0.0.1") -> None:
        self.binary = shutil.which("redis-server")
        if not self.binary:
            raise ServerUnavailable("redis-server not found: apt-get install redis-server")
        self.appendonly = appendonly
        super().__init__(host)
        self.url = f"redis://{host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.directory),
        ]


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def postgres_server(durable: bool = False) -> Iterator[str]:
    """A fresh PostgreSQL cluster for the duration; yields its SQLAlchemy URL."""
    with running(PostgresServer(durable=durable)) as server:
        yield server.url


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis server with no persistence; yields its URL."""
    with running(RedisServer()) as server:
        yield server.url


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


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


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
