"""The database URLs users have: ``postgresql://`` (psql, RDS, most guides) and ``postgres://`` (Heroku-style)."""

import pytest
from sqlalchemy.engine import make_url

from tests.clirun import celebscan
from worker.database import with_driver
from worker.store import ResultStore


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_url_without_a_driver_uses_the_installed_psycopg2(scheme, postgres_url):
    url = make_url(postgres_url).set(drivername=scheme).render_as_string(hide_password=False)
    assert url.startswith(f"{scheme}://")
    store = ResultStore.connect(url)
    try:
        assert store.engine.dialect.driver == "psycopg2"
        assert store.latest_scan_id() is None or store.latest_scan_id() >= 0
    finally:
        store.engine.dispose()
    output = celebscan("--database-url", url, "gallery", "list").output
    assert "Traceback" not in output


def test_an_explicit_driver_and_other_databases_are_kept_as_given():
    assert with_driver("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert with_driver("postgresql+pg8000://u:pw@h/db") == "postgresql+pg8000://u:pw@h/db"
    assert with_driver("sqlite:///celebscan.db") == "sqlite:///celebscan.db"
    assert with_driver("postgres://u:p%40ss@h:5433/db?sslmode=require") == (
        "postgresql+psycopg2://u:p%40ss@h:5433/db?sslmode=require"
    )
