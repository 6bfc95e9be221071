"""Fixtures for real resources: databases (SQLite and a real PostgreSQL), the dev photo set, dlib.

A server whose programs are missing skips its tests with the install command as the reason, except
under CI (``CI=true``), where a missing server is a failure.
"""

from __future__ import annotations

import csv
import os
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


@pytest.fixture(scope="session")
def postgres_url():
    try:
        with postgres_server() as url:
            yield url
    except ServerUnavailable as exc:
        unavailable(str(exc))


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
    """One set of dlib models for the whole session (loading them takes about a second)."""
    from worker.face_embeddings import FaceEmbedder

    return FaceEmbedder()
